"""Build a serialized TensorRT engine from a ``trt``-profile ONNX file.

    onnx (+ external data) ─ lint ─▶ OnnxParser (irc plugins registered) ─▶ strongly typed
    network ─▶ one optimization profile over [batch, seq] ─▶ serialized engine + manifest

The network is strongly typed: every tensor keeps the type the ONNX file gives it, so
precision is chosen at export (``irc export onnx --dtype``), not here (TensorRT 11
networks are always strongly typed; TensorRT 10 needs the flag). The plugins'
ahead-of-time implementation is preferred, so the engine runs without Python.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from irc import __version__
from irc.errors import UserError
from irc.exporters.trt_lint import TOPK_MAX_K, lint_for_tensorrt

__all__ = ["EngineBuildConfig", "build_engine", "engine_manifest_path"]


@dataclass(frozen=True)
class EngineBuildConfig:
    """The optimization profile (inclusive ranges) and builder settings of one engine."""

    min_seq: int = 1
    opt_seq: int = 512
    max_seq: int = 2048
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_gb: float | None = None  # None: TensorRT's default (the device's memory)
    timing_cache: str | None = None  # read if present, written after the build
    prefer_aot: bool = True  # False: the plugins' Python (JIT) implementation

    def __post_init__(self):
        for axis in ("seq", "batch"):
            lo, opt, hi = (getattr(self, f"{k}_{axis}") for k in ("min", "opt", "max"))
            if not 1 <= lo <= opt <= hi:
                raise UserError(f"need 1 <= --min-{axis} <= --opt-{axis} <= --max-{axis}, got {lo}, {opt}, {hi}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise UserError(f"--workspace must be positive (GB), got {self.workspace_gb}")

    def to_dict(self) -> dict:
        return asdict(self)


def engine_manifest_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def check_onnx(onnx_path: Path, config: EngineBuildConfig) -> dict:
    """Refuse, before TensorRT is touched, a file TensorRT would reject; return its manifest."""
    import onnx

    if not onnx_path.is_file():
        raise UserError(f"no such ONNX file: {onnx_path}")
    onnx_manifest_file = onnx_path.with_name(onnx_path.name + ".json")
    onnx_manifest = json.loads(onnx_manifest_file.read_text()) if onnx_manifest_file.is_file() else {}
    if onnx_manifest.get("profile") not in (None, "trt"):
        raise UserError(f"{onnx_path} was exported with --profile {onnx_manifest['profile']}; TensorRT engines "
                        "need the plugin nodes of --profile trt: irc export onnx OUT -o model.onnx --profile trt")
    problems = lint_for_tensorrt(onnx.load(str(onnx_path), load_external_data=False), max_seq=config.max_seq)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        hint = f"; TopK limits --max-seq to {TOPK_MAX_K}" if any("TopK" in p for p in problems) else ""
        raise UserError(f"{onnx_path} is not buildable by TensorRT: {'; '.join(problems[:5])}{more}{hint}")
    return onnx_manifest


def build_engine(onnx_path: str | Path, out: str | Path, config: EngineBuildConfig = EngineBuildConfig(),
                 *, log=print) -> dict:
    """Write ``out`` (the serialized engine) and ``out.json`` (its manifest); return the manifest."""
    from irc.exporters.tensorrt import _import_tensorrt, _require_cuda

    onnx_path, out = Path(onnx_path), Path(out)
    trt = _import_tensorrt()
    _require_cuda()
    onnx_manifest = check_onnx(onnx_path, config)
    from irc.exporters.tensorrt.plugins import PLUGIN_IDS, PLUGIN_VERSION, register_plugins

    register_plugins()
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, config.prefer_aot))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT's ONNX parser rejected {onnx_path}: " + " | ".join(errors))
    log(f"parsed      {onnx_path}: {network.num_layers} layers, {network.num_inputs} inputs")
    builder_config = builder.create_builder_config()
    if config.workspace_gb is not None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * 2**30))
    aliasing = getattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03", None)
    if aliasing is not None:  # TokenScatter writes its output in place over base
        builder_config.set_preview_feature(aliasing, True)
    builder_config.add_optimization_profile(_profile(builder, network, config))
    cache = _load_timing_cache(builder_config, config.timing_cache)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path}; its log above says why")
    if config.timing_cache:
        Path(config.timing_cache).write_bytes(bytes(cache.serialize()))
    seconds = time.perf_counter() - start
    manifest = _manifest(trt, onnx_path, onnx_manifest, out, config, network, seconds,
                         {pid: PLUGIN_VERSION for pid in PLUGIN_IDS})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    engine_manifest_path(out).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out)
    log(f"built       {out} in {seconds:.1f}s ({len(bytes(serialized)) / 2**20:.1f} MiB)")
    return manifest


def _network_flags(trt, prefer_aot: bool) -> int:
    flags = 0
    names = ["STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS" if prefer_aot else "PREFER_JIT_PYTHON_PLUGINS"]
    for name in names:  # each exists from some TensorRT 10.x on (STRONGLY_TYPED is ignored in 11)
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:
            flags |= 1 << int(flag)
    return flags


def _parser_error(err) -> str:
    """One parser error as 'node 12 name (OpType): description'."""
    node = err.node() if hasattr(err, "node") else -1
    name = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    where = f"node {node} {name} ({op})" if node >= 0 else "model"
    return f"{where}: {err.desc()}"


def _profile(builder, network, config: EngineBuildConfig):
    profile = builder.create_optimization_profile()
    lo = (config.min_batch, config.min_seq)
    opt = (config.opt_batch, config.opt_seq)
    hi = (config.max_batch, config.max_seq)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if len(tensor.shape) != 2:
            raise UserError(f"engine input {tensor.name} has shape {tuple(tensor.shape)}; irc engines take "
                            "[batch, seq] token ids and attention mask")
        profile.set_shape(tensor.name, lo, opt, hi)
    return profile


def _load_timing_cache(builder_config, path: str | None):
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = builder_config.create_timing_cache(data)
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _manifest(trt, onnx_path, onnx_manifest, out, config, network, seconds, plugins) -> dict:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "format": "irc-trt-engine",
        "irc_version": __version__,
        "file": out.name,
        "onnx": str(onnx_path),
        "base": onnx_manifest.get("base", {}),
        "plan": onnx_manifest.get("plan"),
        "routing": onnx_manifest.get("routing"),
        "capacity": onnx_manifest.get("capacity"),
        "dtype": onnx_manifest.get("dtype"),
        "profile": {"batch": [config.min_batch, config.opt_batch, config.max_batch],
                    "seq": [config.min_seq, config.opt_seq, config.max_seq]},
        "inputs": [network.get_input(i).name for i in range(network.num_inputs)],
        "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
        "tensorrt": trt.__version__,
        "gpu": {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"},
        "plugins": {"versions": plugins, "implementation": "aot" if config.prefer_aot else "jit"},
        "build_seconds": round(seconds, 2),
        "config": config.to_dict(),
    }
