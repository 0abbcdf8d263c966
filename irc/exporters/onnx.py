"""Export a routed model to ONNX, verified against PyTorch with ONNX Runtime.

The routed graph is re-exported with ``torch.export`` (dynamic batch and
sequence axes) with every routed unit on its traceable path
(``RoutedUnit._traceable``): ``capacity`` routing runs k = ceil(c·T) tokens per
row, so every shape is a function of the input shape (what engines want);
``threshold`` routing (the calibrated per-token decision, the one the model was
trained for) keeps data-dependent token counts (``NonZero``, one ``Kmax`` per
attention unit). ``dense`` exports the base model's graph (``irc.capture``), for
comparisons: not the routed graph in dense mode, which keeps a folded model's folds.
``torch.onnx.export(dynamo=True)`` then lowers it, the irc ops through their
ONNX lowerings: ``portable``, standard ops (``Gather`` / ``ScatterND``);
``trt``, custom-domain ``TokenGather`` / ``TokenScatter`` plugin nodes
(``irc.ops.onnx_plugin``), checked by a structural lint against what
TensorRT's parser accepts. Weights go to external data beside the file.

The export is not done until ONNX Runtime has run it on sample inputs (an odd
length, a left-padded batch) and matched PyTorch (the ``trt`` profile's plugin
nodes run as onnxruntime-extensions Python ops); the results go into a
manifest (``model.onnx.json``). A mismatch fails the export and leaves no file.

Not implemented: Mixture-of-Depths layers (a baseline; its top-k over the whole
row is not causal either).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from irc import __version__
from irc.cache import check_output
from irc.errors import UserError
from irc.nn.lora import merged_lora

ROUTINGS = ("capacity", "threshold", "dense")
TRT_MAX_TOPK = 3840  # TensorRT's TopK limit; the routers' stable sorts are TopK with k = T
PROFILES = ("portable", "trt")
# ORT vs PyTorch on the same fp32 graph: kernels differ in accumulation order.
# Measured: tiny models ≤ 3e-6; SmolLM2 (30 layers, logits of magnitude ~10-30) 1.3e-3,
# with every argmax equal. A flipped routing decision would show as a far larger
# difference and as argmax disagreement.
FP32_ATOL = 5e-3


@dataclass(frozen=True)
class OnnxExportConfig:
    routing: str = "capacity"
    capacity: float | None = None  # default: 1 − the sparsity the model was trained for
    profile: str = "portable"
    opset: int = 18
    max_batch: int = 64
    max_seq: int | None = None
    atol: float = FP32_ATOL
    min_argmax_agreement: float = 0.99

    def __post_init__(self):
        if self.routing not in ROUTINGS:
            raise UserError(f"--routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.profile not in PROFILES:
            raise UserError(f"--profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.capacity is not None and not 0.0 < self.capacity <= 1.0:
            raise UserError(f"--capacity must be in (0, 1], got {self.capacity}")


class _Logits(torch.nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.gm(input_ids, attention_mask)


def _sort_stable(x, *, stable: bool = True, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` as a full-length ``TopK``: ONNX TopK puts the lower index first on ties."""
    from onnxscript import opset18 as op

    k = op.Shape(x, start=dim, end=dim + 1 if dim != -1 else None)
    values, indices = op.TopK(x, k, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def _translations(profile: str) -> dict:
    from irc.ops.token_gather import token_gather_onnx_portable, token_gather_onnx_trt
    from irc.ops.token_scatter import token_scatter_onnx_portable, token_scatter_onnx_trt

    trt = profile == "trt"
    gather = token_gather_onnx_trt if trt else token_gather_onnx_portable
    scatter = token_scatter_onnx_trt if trt else token_scatter_onnx_portable
    table = {
        torch.ops.irc.token_gather.default: gather,
        torch.ops.irc.token_scatter.default: scatter,
        # routers' top-k selection (irc.nn.tokens.top_k_positions) is a stable sort
        torch.ops.aten.sort.stable: _sort_stable,
    }
    grouped_mm = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if grouped_mm is not None:  # MoE experts (Mixtral, Qwen3-MoE): irc.exporters.onnx_moe
        from irc.exporters.onnx_moe import grouped_mm_onnx

        table[grouped_mm.default] = grouped_mm_onnx
    return table


def sample_inputs(vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An odd length, a left-padded batch of 2, and a longer single row."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for B, T, pad in ((1, 7, 0), (2, 16, 5), (1, 64, 0)):
        ids = torch.randint(0, vocab, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        if pad:
            mask[1, :pad] = 0
        samples.append((ids, mask))
    return samples


def export_onnx(routed, out: str | Path, config: OnnxExportConfig = OnnxExportConfig(), *, log=print) -> dict:
    """Write ``out`` (+ ``out.data`` and ``out.json``) and return the manifest."""
    out = check_output(out)
    if routed.plan.variant == "mod" and config.routing != "dense":
        raise UserError("ONNX export of Mixture-of-Depths layers is not implemented (a baseline whose top-k "
                        "over the whole row is not causal); export informed, skip or static models")
    if routed.base.dtype == torch.bfloat16:
        raise UserError("a bf16 ONNX file cannot be verified here: ONNX Runtime's CPU provider has no bf16 "
                        "kernels (Mul, MatMul, ...); export with --dtype fp32 or fp16")
    if config.profile == "trt" and routed.base.dtype != torch.float32:
        raise UserError("--profile trt is verified through onnxruntime-extensions Python ops, which run fp32; "
                        "export with --dtype fp32 (TensorRT builds fp16/bf16 engines from it with strongly "
                        "typed casts, see docs/deploy-tensorrt.md)")
    capacity = None
    if config.routing == "capacity":
        trained = routed.records.get("training", {}).get("sparsity")
        capacity = config.capacity if config.capacity is not None else (1.0 - trained if trained is not None else 1.0)
        routed.set_routing("capacity", capacity=capacity, record=False)
    else:
        routed.set_routing(config.routing, record=False)
    for unit in routed.units.values():
        unit.traceable = True
    max_seq = config.max_seq or routed.arch.max_positions or 8192
    if config.profile == "trt" and config.max_seq is None:
        max_seq = min(max_seq, TRT_MAX_TOPK)
    try:
        start = time.perf_counter()
        # dense: the base model's graph; a folded unit is compile-time, the dense mode leaves it folded
        graph = _base_graph(routed) if config.routing == "dense" else routed.gm
        ids, mask = sample_inputs(routed.arch.vocab)[1]
        batch, seq = Dim("batch", min=1, max=config.max_batch), Dim("seq", min=1, max=max_seq)
        with torch.no_grad(), merged_lora(graph):  # each LoRA-adapted weight as one initializer
            ep = torch.export.export(
                _Logits(graph), (ids, mask),
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                strict=False, prefer_deferred_runtime_asserts_over_guards=True,
            )
        log(f"captured the routed graph in {time.perf_counter() - start:.1f}s")
        start = time.perf_counter()
        program = torch.onnx.export(ep, dynamo=True, custom_translation_table=_translations(config.profile),
                                    opset_version=config.opset, verbose=False)
        log(f"lowered to ONNX opset {config.opset} in {time.perf_counter() - start:.1f}s")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            staged = tmp / out.name
            program.save(str(staged), external_data=True)
            _name_axes(staged)
            lint = _lint(staged, config, max_seq)
            verification = verify(routed, staged, config, reference=None if graph is routed.gm else graph)
            if not verification["passed"]:
                raise UserError(
                    f"ONNX Runtime does not match PyTorch: max abs diff {verification['max_abs_diff']:.3g} "
                    f"(tolerance {config.atol}), argmax agreement {verification['argmax_agreement']:.4f}; "
                    "no file written"
                )
            manifest = _manifest(routed, out, config, capacity, max_seq, staged, verification)
            manifest["trt_lint"] = lint
            (tmp / f"{out.name}.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for f in sorted(tmp.iterdir()):  # data first, the .onnx last: it is what users open
                if f.name != out.name:
                    os.replace(f, out.parent / f.name)
            os.replace(staged, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        for unit in routed.units.values():
            unit.traceable = False
        routed.set_routing("dense", record=True)
    return manifest


def _name_axes(path: Path) -> None:
    """Call the inputs' symbolic dims ``batch`` and ``seq`` everywhere (torch names them s0, s1, …)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    names = {d.dim_param: new for d, new in zip(dims, ("batch", "seq"), strict=False) if d.dim_param}
    if not names:
        return
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = symbol.sub(lambda m: names[m.group(1)], d.dim_param)
    onnx.save(model, str(path))  # the weights stay where they are: external data is not loaded


def _lint(path: Path, config: OnnxExportConfig, max_seq: int) -> dict | None:
    """The ``trt`` profile's structural check against what TensorRT's ONNX parser accepts."""
    if config.profile != "trt":
        return None
    import onnx

    from irc.exporters.trt_lint import lint_for_tensorrt

    problems = lint_for_tensorrt(onnx.load(str(path), load_external_data=False), max_seq=max_seq)
    if problems:
        listed = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UserError(f"the trt-profile graph fails the TensorRT lint ({len(problems)} problems): {listed}; "
                        "no file written")
    return {"passed": True, "max_seq": max_seq}


def _base_graph(routed) -> torch.fx.GraphModule:
    """The base model's captured graph, ``(input_ids, attention_mask) -> logits``."""
    from irc.capture import capture

    return capture(routed.base.model).gm


def verify(routed, path: Path, config: OnnxExportConfig, *, reference=None) -> dict:
    """ONNX Runtime against ``reference(ids, mask)`` (default: ``routed``) on the sample inputs."""
    import onnxruntime as ort

    from irc.exporters.onnx_contrib import inference_session

    try:
        session = inference_session(path)
    except UserError:
        raise
    except Exception as e:  # ORT's own exception types: an op or type it has no kernel for
        raise UserError(f"ONNX Runtime cannot run the exported graph, so it cannot be verified: {e}; "
                        "no file written") from None
    worst, agree, total, cases = 0.0, 0, 0, []
    for ids, mask in sample_inputs(routed.arch.vocab, seed=1):
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            want = (reference or routed)(ids, mask).float().numpy()
        real = mask.bool().numpy()
        diff = float(np.abs(got.astype(np.float32) - want)[real].max())
        same = int((got.argmax(-1) == want.argmax(-1))[real].sum())
        worst = max(worst, diff)
        agree += same
        total += int(real.sum())
        cases.append({"shape": list(ids.shape), "padded": bool((~mask.bool()).any()), "max_abs_diff": diff})
    agreement = agree / total
    return {"passed": worst <= config.atol and agreement >= config.min_argmax_agreement,
            "max_abs_diff": worst, "argmax_agreement": agreement, "atol": config.atol, "cases": cases,
            "onnxruntime": ort.__version__}


def _manifest(routed, out, config, capacity, max_seq, staged, verification) -> dict:
    import onnx

    model = onnx.load(str(staged), load_external_data=False)
    return {
        "format": "irc-onnx",
        "irc_version": __version__,
        "file": out.name,
        "external_data": sorted(p.name for p in staged.parent.iterdir() if p.name not in (out.name,)),
        "base": {"source": routed.base.source.given, "weights_sha256": routed.base.weights_sha256},
        "plan": routed.plan.to_dict(),
        "routing": config.routing,
        "capacity": capacity,
        "profile": config.profile,
        "opset": config.opset,
        "dtype": str(routed.base.dtype).replace("torch.", ""),
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
        "dynamic_axes": {"batch": [1, config.max_batch], "seq": [1, max_seq]},
        "verification": verification,
        "config": asdict(config),
    }
