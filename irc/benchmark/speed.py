"""Dense vs routed prefill speed of one routed model, on one backend.

``bench_speed(routed_dir, backend="torch"|"ort")`` times the dense model and
the routed model on the same real text (windows of the held-out wiki corpus,
since routing decisions depend on content), interleaving the two so that
machine noise hits both alike, and reports the median tokens/s, the speedup,
the range of per-pair speedups, the peak memory each forward needed (a fresh
process per side and length: sampled RSS above the RSS after loading) and the execute fraction the routed model reached.

- ``torch``: dense is the base model's captured graph; routed is the routed
  graph in threshold routing (the calibrated decisions) or capacity routing.
- ``ort``: both are exported ONNX files (``irc export onnx``, fp32, portable),
  made on first use into ``onnx_dir`` (default ``OUT/onnx``) and reused while
  their manifests match the routed model; the execute fraction is PyTorch's on
  the same inputs (the export is verified to route identically).
- ``trt``: TensorRT engines built (``irc export trt``) from ``trt``-profile
  exports of both, with one profile up to the longest length and the batch;
  inputs go to the GPU. Needs the ``trt`` extra and an NVIDIA GPU.

Legend: B batch, T tokens.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from irc.errors import UserError

BENCH_BACKENDS = ("torch", "ort", "trt")


@dataclass(frozen=True)
class SpeedConfig:
    seq_lens: tuple[int, ...] = (128, 512, 1024, 2048)
    batch: int = 1
    routing: str = "threshold"
    capacity: float | None = None  # capacity routing: default 1 − the trained sparsity
    dtype: str = "bf16"  # torch only; ONNX files are fp32
    warmup: int = 1
    repeats: int = 5
    threads: int | None = None
    data: str = "wiki:heldout"  # the text the inputs are cut from (a corpus spec, as irc eval --data)
    memory: bool = True  # peak memory per side and length, each in a fresh process

    def __post_init__(self):
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise UserError(f"--seq-lens must be positive lengths, got {self.seq_lens}")
        if self.batch < 1:
            raise UserError(f"--batch must be positive, got {self.batch}")
        if self.routing not in ("threshold", "capacity"):
            raise UserError(f"--routing must be threshold or capacity, got {self.routing!r}")
        if self.repeats < 1 or self.warmup < 0:
            raise UserError("--repeats must be ≥ 1 and --warmup ≥ 0")


@dataclass
class SpeedResult:
    model: str
    backend: str
    config: SpeedConfig
    rows: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, "config": asdict(self.config),
                **self.meta, "rows": self.rows}


def text_inputs(tokenizer, batch: int, seq: int, data: str = "wiki:heldout") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` consecutive windows of ``seq`` tokens of ``data`` (repeated if the corpus is short)."""
    from irc.data import load_corpus, token_stream

    stream = torch.from_numpy(token_stream(load_corpus(data), tokenizer).astype("int64"))
    need = batch * seq
    if len(stream) < need:
        stream = stream.repeat(need // len(stream) + 1)
    ids = stream[:need].view(batch, seq)  # [B, T]
    return ids, torch.ones_like(ids)


def _interleaved(dense, routed, ids, mask, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        dense(ids, mask)
        routed(ids, mask)
    td, tr = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        dense(ids, mask)
        td.append(time.perf_counter() - start)
    for _ in range(repeats):
        start = time.perf_counter()
        routed(ids, mask)
        tr.append(time.perf_counter() - start)
    # a second, interleaved set: pairs run back to back, so noise hits both sides of a pair alike
    for _ in range(repeats):
        start = time.perf_counter()
        dense(ids, mask)
        td.append(time.perf_counter() - start)
        start = time.perf_counter()
        routed(ids, mask)
        tr.append(time.perf_counter() - start)
    pairs = sorted(a / b for a, b in zip(td[repeats:], tr[repeats:], strict=True))
    d, r = statistics.median(td), statistics.median(tr)
    return {"dense_ms": d * 1e3, "routed_ms": r * 1e3, "speedup": d / r,
            "speedup_pair_min": pairs[0], "speedup_pair_max": pairs[-1]}


def _execute_fraction(routed, ids, mask) -> tuple[float | None, float]:
    """(execute fraction over every routed unit, FLOPs per token saved) on this input."""
    from irc.eval.routed import routed_flops
    from irc.eval.sparsity import all_units

    units = all_units(routed).values()
    for unit in units:
        unit.reset_stats()
        unit.record = True
    with torch.inference_mode():
        routed(ids, mask)
    executed = sum(u.executed for u in units)
    tokens = sum(u.tokens for u in units)
    return (executed / tokens if tokens else None), routed_flops(routed, ids.shape[1])["saved"]


def _onnx_pair(routed, routed_dir: Path, config: SpeedConfig, onnx_dir: Path, log, profile: str = "portable"):
    """Paths of the dense and routed ONNX files for ``routed`` (fp32), exported unless there and current."""
    from irc.exporters.onnx import OnnxExportConfig, export_onnx

    paths = {}
    prefix = "" if profile == "portable" else f"{profile}-"
    for name, routing in (("dense", "dense"), ("routed", config.routing)):
        stem = routing if routing != "capacity" else f"capacity-{config.capacity}"
        path = onnx_dir / f"{prefix}{stem}.onnx"
        manifest = path.with_name(path.name + ".json")
        current = False
        if path.is_file() and manifest.is_file():
            m = json.loads(manifest.read_text())
            current = (m.get("base", {}).get("weights_sha256") == routed.base.weights_sha256
                       and m.get("plan") == routed.plan.to_dict() and m.get("routing") == routing
                       and m.get("profile", "portable") == profile
                       and m.get("routing_weights_sha256") == _routing_sha(routed_dir))
        if not current:
            log(f"exporting {routing} ONNX to {path} (once; reused while the routed model is unchanged)")
            export_onnx(routed, path, OnnxExportConfig(routing=routing, capacity=config.capacity, profile=profile),
                        log=log)
            m = json.loads(manifest.read_text())
            m["routing_weights_sha256"] = _routing_sha(routed_dir)
            manifest.write_text(json.dumps(m, indent=2) + "\n")
        paths[name] = path
    return paths["dense"], paths["routed"]


def _engine_pair(routed, routed_dir: Path, config: SpeedConfig, onnx_dir: Path, log):
    """Engines for the dense and routed ``trt``-profile exports, built unless already there."""
    from irc.exporters.tensorrt import EngineBuildConfig, build_engine

    longest = max(config.seq_lens)
    build = EngineBuildConfig(max_seq=longest, opt_seq=longest, max_batch=config.batch, opt_batch=config.batch)
    engines = []
    for onnx_path in _onnx_pair(routed, routed_dir, config, onnx_dir, log, profile="trt"):
        engine = onnx_path.with_name(f"{onnx_path.stem}-b{config.batch}-t{longest}.engine")
        if not engine.is_file() or engine.stat().st_mtime < onnx_path.stat().st_mtime:
            log(f"building {engine}")
            build_engine(onnx_path, engine, build, log=log)
        engines.append(engine)
    return tuple(engines)


def _routing_sha(routed_dir: Path) -> str:
    from irc.cache import cached_sha256

    return cached_sha256([routed_dir / "routing.safetensors"])


def bench_speed(routed_dir: str | Path, backend: str = "torch", config: SpeedConfig = SpeedConfig(), *,
                onnx_dir: str | Path | None = None, log=print) -> SpeedResult:
    import irc
    from irc.routing import is_routed_dir

    routed_dir = Path(routed_dir)
    if backend not in BENCH_BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BENCH_BACKENDS)}, got {backend!r}")
    if not is_routed_dir(routed_dir):
        raise UserError(f"{routed_dir} is not a routed model directory (made by irc convert)")
    if config.threads:
        torch.set_num_threads(config.threads)
    dtype = config.dtype if backend == "torch" else "fp32"
    if backend == "trt":
        from irc.exporters.tensorrt import _import_tensorrt

        _import_tensorrt()
    routed = irc.load(routed_dir, dtype=dtype)
    trained = routed.records.get("training", {}).get("sparsity")
    if config.routing == "capacity" and config.capacity is None:
        from dataclasses import replace

        config = replace(config, capacity=1.0 - (trained or 0.0))
    onnx_paths = None
    if backend == "trt":
        from irc.exporters.tensorrt import _import_tensorrt, _require_cuda

        _import_tensorrt()  # the one-line install message, before any export work
        _require_cuda()
        onnx_paths = _engine_pair(routed, routed_dir, config, Path(onnx_dir or routed_dir / "onnx"), log)
    elif backend == "ort":
        onnx_paths = _onnx_pair(routed, routed_dir, config, Path(onnx_dir or routed_dir / "onnx"), log)
    dense = open_side(routed_dir, backend, "dense", config, onnx_paths, routed=routed)
    routed_call = open_side(routed_dir, backend, "routed", config, onnx_paths, routed=routed)
    routed.set_routing(config.routing, capacity=config.capacity, record=False)
    result = SpeedResult(str(routed_dir), backend, config, meta={
        "trained_sparsity": trained, "dtype": dtype, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()} ({platform.processor() or 'cpu'})",
    })
    if backend == "ort":
        import onnxruntime as ort

        result.meta["onnxruntime"] = ort.__version__
    inputs = {T: text_inputs(routed.base.tokenizer, config.batch, T, config.data)[0] for T in config.seq_lens}
    for T in config.seq_lens:
        ids = inputs[T]
        mask = torch.ones_like(ids)
        fraction, flops_saved = _execute_fraction(routed, ids, mask)
        routed.set_routing(config.routing, capacity=config.capacity, record=False)
        with torch.inference_mode():
            row = _interleaved(dense, routed_call, ids, mask, config.warmup, config.repeats)
        row = {"seq_len": T, "batch": config.batch, **row,
               "dense_tok_s": config.batch * T / (row["dense_ms"] / 1e3),
               "routed_tok_s": config.batch * T / (row["routed_ms"] / 1e3), "execute_fraction": fraction,
               "flops_saved": flops_saved}
        result.rows.append(row)
        log(f"T={T:5d} B={config.batch}: dense {row['dense_ms']:8.1f} ms  routed {row['routed_ms']:8.1f} ms  "
            f"speedup {row['speedup']:.2f}x [{row['speedup_pair_min']:.2f}-{row['speedup_pair_max']:.2f}]  "
            f"executed {fraction:.3f}  FLOPs saved {100 * flops_saved:.1f}%")
    if config.memory and backend == "trt":
        log("peak memory is not measured for engines (TensorRT allocates outside this process's RSS view)")
    elif config.memory:
        for side in ("dense", "routed"):
            log(f"peak memory of {side}: a fresh process per length ...")
            peaks = memory_profile(routed_dir, backend, side, config, onnx_paths, inputs)
            for row in result.rows:
                row[f"{side}_peak_extra_mb"] = peaks[str(row["seq_len"])]
    return result


def open_side(routed_dir: Path, backend: str, side: str, config: SpeedConfig, onnx_paths=None, *, routed=None):
    """The dense or routed model as an ``(ids, mask) -> logits`` callable on ``backend``."""
    if backend == "ort":
        from irc.exporters.onnx_runtime import OnnxModel

        return OnnxModel(onnx_paths[0 if side == "dense" else 1])
    if backend == "trt":
        from irc.exporters.tensorrt import Engine

        engine = Engine(onnx_paths[0 if side == "dense" else 1])

        def run(ids, mask):
            logits = engine(ids.cuda(), mask.cuda())  # stays on the GPU
            torch.cuda.synchronize()
            return logits

        return run
    if routed is None:
        import irc

        routed = irc.load(routed_dir, dtype=config.dtype)
    if side == "dense":
        from irc.capture import capture

        return capture(routed.base.model).gm
    routed.set_routing(config.routing, capacity=config.capacity, record=False)
    return routed


def memory_profile(routed_dir: Path, backend: str, side: str, config: SpeedConfig, onnx_paths,
                   inputs: dict[int, torch.Tensor]) -> dict:
    """Peak RSS of one forward at each length, above the RSS after loading: one fresh process each.

    In the benchmarking process both models and their allocators' caches share one
    RSS, which cannot tell what each forward needs; and in a process that already ran
    another length, the allocator's free lists and fragmentation from that run count
    too. So every (side, length) loads its model in a new process and runs once.
    """
    import os
    import subprocess
    import sys
    import tempfile

    peaks = {}
    with tempfile.TemporaryDirectory(prefix="irc-bench-") as tmp:
        for T, ids in inputs.items():
            ids_path = Path(tmp) / f"inputs-{T}.pt"
            torch.save({str(T): ids}, ids_path)
            spec = {"routed_dir": str(routed_dir), "backend": backend, "side": side, "config": asdict(config),
                    "onnx_paths": [str(p) for p in onnx_paths] if onnx_paths else None, "inputs": str(ids_path)}
            done = subprocess.run([sys.executable, "-m", "irc.benchmark.speed", json.dumps(spec)],
                                  capture_output=True, text=True, env={**os.environ, "IRC_PROGRESS": "0"})
            if done.returncode != 0:
                raise RuntimeError(f"memory measurement of {side} at T={T} failed:\n{done.stderr[-2000:]}")
            peaks.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return peaks


def _memory_main(spec: dict) -> dict:
    from irc.eval.memory import RssPeak

    config = SpeedConfig(**{**spec["config"], "seq_lens": tuple(spec["config"]["seq_lens"])})
    if config.threads:
        torch.set_num_threads(config.threads)
    paths = [Path(p) for p in spec["onnx_paths"]] if spec["onnx_paths"] else None
    model = open_side(Path(spec["routed_dir"]), spec["backend"], spec["side"], config, paths)
    inputs = torch.load(spec["inputs"], weights_only=True)
    peaks = {}
    with torch.inference_mode():
        base = RssPeak._rss_mb()
        for T in sorted(inputs, key=int):
            with RssPeak() as mem:
                model(inputs[T], torch.ones_like(inputs[T]))
            peaks[T] = max(mem.peak_mb - base, 0.0)
    return peaks


if __name__ == "__main__":
    import sys

    print(json.dumps(_memory_main(json.loads(sys.argv[1]))))


def _mb(row: dict, side: str) -> str:
    value = row.get(f"{side}_peak_extra_mb")
    return "—" if value is None else f"{value:,.0f}"


def _fmt_pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def markdown_table(result: SpeedResult) -> list[str]:
    lines = ["| T | B | dense tok/s | routed tok/s | speedup (medians) | pair range | executed | FLOPs saved | "
             "dense peak extra MB | routed peak extra MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {r['seq_len']} | {r['batch']} | {r['dense_tok_s']:,.0f} | {r['routed_tok_s']:,.0f} | "
                     f"{r['speedup']:.2f}× | {r['speedup_pair_min']:.2f}–{r['speedup_pair_max']:.2f}× | "
                     f"{r['execute_fraction']:.3f} | {_fmt_pct(r.get('flops_saved'))} | {_mb(r, 'dense')} | "
                     f"{_mb(r, 'routed')} |")
    return lines
