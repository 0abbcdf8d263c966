"""Export the routed decode step to ONNX (past/present KV), and generate with ONNX Runtime.

One graph serves the prompt and every decode step, as in PyTorch
(``irc.generation.capture``)::

    decode.onnx(input_ids [B, T], attention_mask [B, P+T], past.{l}.key / past.{l}.value [B, Hkv, P, hd])
        -> logits [B, T, V], present.{l}.key / present.{l}.value [B, Hkv, P+T, hd],
           decisions [U, B, T] (threshold routing: each routed unit's executed tokens, bool)

with P = 0 for the prompt (prompts shorter than 4 tokens left-padded, as
``generate`` does). A forecast-folded attention layer keeps its sinks only
(``irc.passes.compact_sink_caches``): its past / present have min(n_sink, P) /
min(n_sink, P+T) positions, a dynamic axis of its own (at most n_sink), and the
manifest's ``cache.sink_slots`` names those tensors. Routing in the file:

- ``threshold``: every unit decides per token exactly as in PyTorch. With
  ``branches`` (the default) the work sits behind ``If`` nodes on the decision
  (``irc.nn.decode_branches``): an approximated token runs the forecaster only,
  an executed one the unit only (batch 1), executed rows are gathered (batch > 1),
  and a forecast-folded unit's sink-slot work runs only on steps with a new sink.
  ``branches=False``: branch-free (the unit and the forecaster run on every new
  token, the decision selects): the same tokens, none of the speed.
- ``dense``: the base model with a KV cache (``irc.generation.decoder.dense_decoder``: no
  routed and no folded unit, where the routed graph in dense mode would still forecast
  its forecast-folded units), the baseline of speed comparisons.

The step file (``OnnxDecodeConfig.step_file``, off by default): ``decode_step.onnx`` beside
``decode.onnx``, the same step exported with B = T = 1 static (the past still dynamic, at
least 3 positions). Each routed unit branches once, on its token's decision (the general
file nests ``If(any)`` → ``If(all)`` → unit | gathered), sizes are constants rather than shape
arithmetic inside the branches, and no ``NonZero`` path is written. ``OrtDecoder`` runs
one-token steps at batch 1 (what most decoding is) through it, and everything else (the
prompt, B > 1) through the general file. It costs a second session, which holds its own copy
of the weights, and a second external-data file; on this CPU it bought nothing measurable,
so it is off by default. On the 20%-FLOP folded SmolLM2, one step at P = 256, 10th percentile
of interleaved blocks (``bench/ort_branch_cost.py``, general / step): on the cache of a real
prompt, threshold 1.00×, all-exec 1.03×, none-exec 1.00×, dense 0.94× (the dense step file
slower); on a random cache (a scratch probe), threshold 1.05×, dense 0.985×. What the routed
step pays for is mostly its ``If`` nodes and routers, not shape arithmetic (that script).

``decisions`` (threshold routing, ``OnnxDecodeConfig.decisions``): row u is the
decision of routed unit u (the manifest's ``decision_units``) on every new token,
True where it executed (a real token, routed or a sink); ``OrtDecoder`` counts them,
so generation through ONNX Runtime reports its execute fraction as PyTorch does.

Grouped-query attention (``OnnxDecodeConfig.grouped_attention``, the default): the
file attends with the cache's own Hkv heads, the query's n_rep heads per key/value
head as rows of one matmul (``irc.passes.grouped_kv_attention``); False writes the
exporter's SDPA over keys and values expanded n_rep-fold, which copies the whole
cache n_rep-fold and transposes it every step (SmolLM2 dense: 33.5 → 27.5 ms per step
at B = 1, 108 → 59 at B = 8; ``bench/decode_overhead.py --backend ort``).

``portable`` profile (standard ONNX ops), fp32. The export is not done until
ONNX Runtime has generated from sample prompts (an odd length, a left-padded
batch) the same tokens as PyTorch, greedy, with logits within ``FP32_ATOL``;
a mismatch leaves no file. ``OrtDecoder`` runs the file in ``irc.generation.generate``.

The KV cache in ONNX Runtime (``OrtDecoder``, ``GenerationConfig.kv_cache``):

- ``static`` (the default of ``generate``): I/O binding. The cache never leaves ONNX
  Runtime: each step binds the previous step's ``present.*`` OrtValues as its
  ``past.*`` inputs (``bind_ortvalue_input``) and lets ORT allocate the new presents
  on the session's device (``bind_output``); only the logits come back as an array.
  No numpy array of the cache is made, fed or converted, and on a GPU provider the
  cache stays in device memory: without binding every step copies the whole past
  host→device and the whole present device→host (2 · cache bytes over the bus).
- ``copy``: ``session.run`` with numpy arrays (the cache round-trips through numpy;
  on the CPU provider ORT 1.32 wraps inputs and outputs without copying them).

What binding cannot remove: the file's ``present = Concat(past, new)`` per layer
copies the P past positions into the new present inside ORT (2 · L · B · Hkv · (P+T)
· hd · 4 bytes per step). Binding ``present.*`` onto the ``past.*`` buffers
(``bind_ortvalue_output``) needs a graph that writes in place into a fixed-capacity
buffer (ScatterND / opset-24 ``TensorScatter`` at a write position, attention over
the capacity under the mask, positions from an input rather than from the past's
length): a different capture of the decode step, not done here. The torch decoder
does write in place (``irc.generation.static_cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from irc import __version__
from irc.errors import UserError
from irc.exporters.onnx import FP32_ATOL, _translations
from irc.generation.capture import MIN_CONTEXT
from irc.nn.lora import merged_lora
from irc.passes.grouped_kv_attention import expanded_export
from irc.passes.route_decoder_blocks import folded_modules

ROUTINGS = ("threshold", "dense")
FILE = "decode.onnx"
STEP_FILE = "decode_step.onnx"  # the one-token, batch-1 step (OnnxDecodeConfig.step_file)
DECISIONS = "decisions"  # the output of every routed unit's decisions, [U, B, T] bool
# how the files are made, where the settings do not say it; a cached export of another revision is redone.
# 2: LoRA-adapted weights merged into one initializer each (irc.nn.lora.merged_lora); 1 had B·A in the graph
# 3: the dense file is the base model's decode step (dense_decoder); 2 kept a folded model's folded units
REVISION = 3


@dataclass(frozen=True)
class OnnxDecodeConfig:
    routing: str = "threshold"
    profile: str = "portable"
    opset: int = 18
    max_batch: int = 64
    atol: float = FP32_ATOL
    verify_tokens: int = 8
    # threshold routing behind ONNX If nodes (torch.cond, irc.nn.decode_branches); False: branch-free
    branches: bool = True
    # threshold routing: a ``decisions [U, B, T]`` output, so ONNX Runtime reports the execute fraction
    decisions: bool = True
    # grouped-query attention as matmuls over the cache's own heads (irc.passes.grouped_kv_attention);
    # False: the exporter's SDPA over n_rep-fold keys and values, expanded every step (files before it)
    grouped_attention: bool = True
    # a second file for the one-token steps of batch 1 (B = T = 1 static, one If per routed unit);
    # off by default: on this CPU it measured no gain and costs a second copy of the weights (module doc)
    step_file: bool = False

    def __post_init__(self):
        if self.routing == "dense":  # every unit runs: there are no decisions to report
            object.__setattr__(self, "decisions", False)
        if self.routing not in ROUTINGS:
            raise UserError(f"ONNX decode routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.profile != "portable":
            raise UserError(f"ONNX decode supports the portable profile only, got {self.profile!r}")
        if self.verify_tokens < 1:
            raise UserError(f"verify_tokens must be positive, got {self.verify_tokens}")

    def cache_key(self) -> str:
        """The settings that make the file, for the export cache. ``decisions``, ``grouped_attention`` and
        ``step_file`` (added after the first exports) count only where set, so a file exported before
        them, made the same way, keeps its key."""
        fields = asdict(self)
        fields = {k: v for k, v in fields.items() if v or k not in ("decisions", "grouped_attention", "step_file")}
        return f"OnnxDecodeConfig({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class _Step(torch.nn.Module):
    """The decode step; with ``units``, also every routed unit's decisions ``[U, B, T]`` (bool, graph order)."""

    def __init__(self, gm, units: list | None = None):
        super().__init__()
        self.gm = gm
        self.units = units or []

    def forward(self, input_ids, attention_mask, *past):
        if not self.units:
            return self.gm(input_ids, attention_mask, *past)
        collected: list[torch.Tensor] = []
        for unit in self.units:
            unit.decisions = collected
        try:
            logits, *present = self.gm(input_ids, attention_mask, *past)
        finally:
            for unit in self.units:
                unit.decisions = None
        if len(collected) != len(self.units):
            raise RuntimeError(f"{len(collected)} of {len(self.units)} routed units reported decisions")
        return logits, *present, torch.stack(collected)


def _torch_decoder(routed, routing: str):
    """The PyTorch decode graph a file of this routing is exported from and verified against."""
    from irc.generation.decoder import decoder_for, dense_decoder

    return dense_decoder(routed) if routing == "dense" else decoder_for(routed)


def _names(n_cache: int) -> tuple[list[str], list[str]]:
    kinds = ("key", "value")
    past = [f"past.{i // 2}.{kinds[i % 2]}" for i in range(n_cache)]
    present = [f"present.{i // 2}.{kinds[i % 2]}" for i in range(n_cache)]
    return past, present


def _routing(decoder, routing: str, branches: bool) -> None:
    """The decode units in the export's routing, no counters: behind ``If`` nodes, or branch-free."""
    for unit in decoder.units.values():
        unit.mode = routing
        unit.sparse = False
        unit.branches = branches
        unit.record = False
        unit.keep = None
    for unit in folded_modules(decoder.gm).values():
        unit.branches = branches


def _unbranch(decoder) -> None:
    for unit in [*decoder.units.values(), *folded_modules(decoder.gm).values()]:
        unit.branches = False


_ASSERTS = ("aten._assert_scalar.default", "aten._assert_async.msg", "aten.sym_constrain_range_for_size.default")


def _drop_shape_asserts(ep) -> None:
    """Remove the runtime shape asserts of a program with ``torch.cond`` branches (ONNX keeps none anyway).

    Dynamo traces each branch with fresh sizes for its operands and records the shape checks it
    meets there as asserts that hold for the export's example only (e.g. "past length != 0", from
    P = 5): the ONNX exporter re-runs them on its fake inputs and fails. The branch graphs are
    fixed ATen ops, so those checks chose no code path; ``verify_decode`` runs the file at P = 0.
    """
    root = ep.graph_module
    for gm in root.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and str(node.target) in _ASSERTS:
                gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gm.recompile()
    for node in root.graph.nodes:  # the same asserts, kept by the shape environment for re-tracing
        val = node.meta.get("val")
        shape_env = getattr(getattr(val, "fake_mode", None), "shape_env", None)
        if shape_env is not None:
            shape_env.deferred_runtime_asserts.clear()
            break


def _lower(step: _Step, routed, decoder, config: OnnxDecodeConfig, output_names: list[str], *, batch: int, new: int,
           log) -> torch.onnx.ONNXProgram:
    """Capture ``step`` and lower it to ONNX.

    ``batch=2, new=3``: the general file (batch, new tokens and past dynamic). ``batch=1, new=1``:
    the step file, batch and new tokens static, so each routed unit branches once on its token's
    decision (``irc.nn.decode_branches.one_token``) and sizes other than the past's are constants,
    not shape arithmetic inside the branches. Its past has at least 3 positions: a prompt is
    left-padded to ``MIN_CONTEXT`` = 4 tokens, so a one-token step always has a past of 4 or more.
    """
    slots = decoder.cache_slots()  # per cache tensor: n_sink where it keeps the sinks only, else None
    past_names = _names(len(slots))[0]
    P = 5
    ids = torch.randint(0, routed.arch.vocab, (batch, new))
    mask = torch.ones(batch, P + new, dtype=torch.long)
    past = [torch.randn(batch, c.shape[1], P if n is None else min(n, P), c.shape[3])
            for c, n in zip(decoder.empty_cache(batch), slots, strict=True)]
    max_seq = routed.arch.max_positions or 8192
    sinks = {n: Dim(f"sinks{n}", min=0, max=n) for n in set(slots) - {None}}  # n >= 2: not specialised
    if new == 1:
        past_len = Dim("past", min=MIN_CONTEXT - 1, max=max_seq)
        dynamic = {"input_ids": None, "attention_mask": {1: past_len + 1},
                   "past": tuple({2: past_len if n is None else sinks[n]} for n in slots)}
    else:
        b, seq, past_len = Dim("batch", min=1, max=config.max_batch), Dim("seq", min=1, max=max_seq), \
            Dim("past", min=0, max=max_seq)
        dynamic = {"input_ids": {0: b, 1: seq}, "attention_mask": {0: b, 1: Dim.AUTO},
                   "past": tuple({0: b, 2: past_len if n is None else sinks[n]} for n in slots)}
    what = "the one-token step" if new == 1 else "the routed decode step"
    start = time.perf_counter()
    with torch.no_grad(), expanded_export(not config.grouped_attention), merged_lora(step):
        ep = torch.export.export(step, (ids, mask, *past), dynamic_shapes=dynamic, strict=False,
                                 prefer_deferred_runtime_asserts_over_guards=True)
    if config.branches:
        _drop_shape_asserts(ep)
    log(f"captured {what} in {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    program = torch.onnx.export(ep, dynamo=True, custom_translation_table=_translations(config.profile),
                                opset_version=config.opset, verbose=False,
                                input_names=["input_ids", "attention_mask", *past_names], output_names=output_names)
    log(f"lowered {what} to ONNX opset {config.opset} in {time.perf_counter() - start:.1f}s")
    return program


def export_decode(routed, out_dir: str | Path, config: OnnxDecodeConfig = OnnxDecodeConfig(), *, log=print) -> dict:
    """Write ``out_dir/decode.onnx`` (+ external data and ``decode.onnx.json``); return the manifest."""
    if routed.base.dtype != torch.float32:
        raise UserError(f"ONNX decode export runs in fp32; load the model with dtype fp32 (got {routed.base.dtype})")
    if routed.plan.kv_policy == "drop" and config.routing == "threshold":
        raise UserError("ONNX decode export of kv_policy='drop' is not implemented (the dropped keys would be "
                        "extra cache state); export a kv_policy='keep' model")
    out_dir = Path(out_dir)
    decoder = _torch_decoder(routed, config.routing)
    _routing(decoder, config.routing, config.branches)
    empty = decoder.empty_cache(1)[0]  # [1, Hkv, 0, hd]
    n_cache = len(decoder.empty_cache(1))
    slots = decoder.cache_slots()  # per cache tensor: n_sink where it keeps the sinks only, else None
    past_names, present_names = _names(n_cache)
    reported = list(decoder.units) if config.decisions else []  # dense: decisions is off
    extra_outputs = [DECISIONS] if reported else []
    output_names = ["logits", *present_names, *extra_outputs]
    programs = {}
    try:
        step = _Step(decoder.gm, [decoder.units[name] for name in reported])
        programs[FILE] = _lower(step, routed, decoder, config, output_names, batch=2, new=3, log=log)
        if config.step_file:
            programs[STEP_FILE] = _lower(step, routed, decoder, config, output_names, batch=1, new=1, log=log)
    finally:
        _unbranch(decoder)
        decoder.sync()  # back to the prefill units' settings
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".decode.tmp-", dir=out_dir))
    try:
        staged = tmp / FILE
        for name, program in programs.items():
            program.save(str(tmp / name), external_data=True)
        verification = verify_decode(routed, staged, config)
        if not verification["passed"]:
            raise UserError(
                f"ONNX Runtime decoding does not match PyTorch: tokens equal {verification['tokens_equal']}, "
                f"max abs logit diff {verification['max_abs_diff']:.3g} (tolerance {config.atol}); no file written")
        manifest = {
            "format": "irc-onnx-decode", "revision": REVISION, "irc_version": __version__, "file": FILE,
            "base": {"source": routed.base.source.given, "weights_sha256": routed.base.weights_sha256},
            "plan": routed.plan.to_dict(), "routing": config.routing, "profile": config.profile,
            "opset": config.opset, "dtype": "float32", "routing_sha256": routing_digest(routed),
            "inputs": ["input_ids", "attention_mask", *past_names],
            "outputs": output_names, "decision_units": reported,
            "step_file": STEP_FILE if config.step_file else None,
            "cache": {"tensors": n_cache, "kv_heads": int(empty.shape[1]), "head_dim": int(empty.shape[3]),
                      "sink_slots": {past_names[i]: n for i, n in enumerate(slots) if n is not None}},
            "min_context": MIN_CONTEXT, "verification": verification, "config": asdict(config),
        }
        (tmp / f"{FILE}.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for f in sorted(tmp.iterdir()):  # data and the step file first, the .onnx last
            if f.name != FILE:
                os.replace(f, out_dir / f.name)
        if not config.step_file:  # a step file left by an earlier export would be taken for this one's
            (out_dir / STEP_FILE).unlink(missing_ok=True)
        os.replace(staged, out_dir / FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def sample_prompts(vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An odd-length prompt, and a left-padded batch of two."""
    from irc.generation import left_pad

    g = torch.Generator().manual_seed(seed)
    one = torch.randint(0, vocab, (1, 7), generator=g)
    rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 11)]
    return [(one, torch.ones_like(one)), left_pad(rows, pad_id=0)]


def verify_decode(routed, path: Path, config: OnnxDecodeConfig) -> dict:
    """Greedy generation through ONNX Runtime against PyTorch: the same tokens, close logits."""
    import onnxruntime as ort

    from irc.generation import GenerationConfig, generate

    ort_decoder = OrtDecoder(path)
    decoder = _torch_decoder(routed, config.routing)
    saved = {name: (u.mode, u.sparse, u.record) for name, u in decoder.units.items()}
    gen = GenerationConfig(max_new_tokens=config.verify_tokens, stop_at_eos=False)
    worst, equal, cases = 0.0, True, []
    try:
        for unit in decoder.units.values():
            unit.mode, unit.record = config.routing, True
        for ids, mask in sample_prompts(routed.arch.vocab, seed=1):
            want = generate(decoder, ids, mask, gen)
            got = generate(ort_decoder, ids, mask, gen)
            same = want.tokens == got.tokens
            # logits of the prompt and of one decode step, along PyTorch's tokens
            diff = _logit_diff(decoder, ort_decoder, ids, mask, want.tokens)
            worst, equal = max(worst, diff), equal and same
            case = {"shape": list(ids.shape), "padded": bool((mask == 0).any()), "tokens_equal": same,
                    "max_abs_diff": diff, "execute_fraction": got.execute_fraction}
            if ort_decoder.decision_units:  # recorded, not required: a margin at θ may round either way
                case["decisions_equal"] = (list(got.execute_fractions.values())
                                           == list(want.execute_fractions.values()))
            cases.append(case)
    finally:
        for name, unit in decoder.units.items():
            unit.mode, unit.sparse, unit.record = saved[name]
    return {"passed": equal and worst <= config.atol, "tokens_equal": equal, "max_abs_diff": worst,
            "atol": config.atol, "cases": cases, "onnxruntime": ort.__version__}


def _logit_diff(decoder, ort_decoder, ids, mask, tokens) -> float:
    B = ids.shape[0]
    with torch.no_grad():
        a, pa = decoder.step(ids, mask, decoder.empty_cache(B))
        b, pb = ort_decoder.step(ids, mask, ort_decoder.empty_cache(B))
        real = mask.bool()
        worst = float((a.float() - b)[real].abs().max())
        nxt = torch.tensor([[r[0]] for r in tokens])
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        a, _ = decoder.step(nxt, mask, pa)
        b, _ = ort_decoder.step(nxt, mask, pb)
    return max(worst, float((a.float() - b).abs().max()))


class OrtDecoder:
    """``decode.onnx`` behind the stepping interface of ``irc.generation.decoder.Decoder``."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, session_options=None):
        import onnxruntime as ort

        path = Path(path)
        self.path = path / FILE if path.is_dir() else path
        if not self.path.is_file():
            raise UserError(f"no ONNX decode export at {self.path}")
        manifest = self.path.with_name(self.path.name + ".json")
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
        self.session = ort.InferenceSession(str(self.path), session_options,
                                            providers=providers or ["CPUExecutionProvider"])
        # the one-token, batch-1 file beside it (OnnxDecodeConfig.step_file): a second session, which holds
        # its own copy of the weights; None where the export made none
        step_file = self.path.with_name(STEP_FILE)
        self.step_session = ort.InferenceSession(str(step_file), session_options,
                                                 providers=providers or ["CPUExecutionProvider"]) \
            if step_file.is_file() else None
        inputs = self.session.get_inputs()
        self.cache_names = [i.name for i in inputs[2:]]
        self.kv_heads, self.head_dim = inputs[2].shape[1], inputs[2].shape[3]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # routed units reporting their decisions (the file's ``decisions`` output), in its row order;
        # named by the manifest (a file not yet given one, as verify_decode runs it: by position)
        self.decision_units: list[str] = []
        if DECISIONS in self.output_names:
            rows = self.session.get_outputs()[self.output_names.index(DECISIONS)].shape[0]
            self.decision_units = self.manifest.get("decision_units") or [f"unit{i}" for i in range(rows)]
        self.reset_stats()
        # I/O binding (kv_cache="static"): the cache lives where the session computes
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self._bindings: dict[int, tuple] = {}  # id(session) -> (session, its IOBinding), made on first use

    def empty_cache(self, batch: int, capacity: int | None = None) -> list:
        """Length-0 past keys and values: right for full-length and sink-slot layers alike.

        ``capacity`` given (``kv_cache="static"``): OrtValues, so ``step`` runs with I/O
        binding and keeps the cache in ORT (see the module doc; the capacity itself is
        not needed: the file's presents are allocated by ORT). None: numpy arrays, ``run``.
        """
        empty = [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.cache_names]
        if capacity is None:
            return empty
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(e, self.device, 0) for e in empty]

    def cache_slots(self) -> list[int | None]:
        """Per cache tensor: its sink slots where it keeps only those (the manifest says), else None."""
        sink_slots = self.manifest.get("cache", {}).get("sink_slots", {})
        return [sink_slots.get(name) for name in self.cache_names]

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list):
        """Logits ``[B, T, V]`` and the present cache: OrtValues if ``past`` holds OrtValues
        (I/O binding), else numpy arrays."""
        feeds = {"input_ids": input_ids.numpy().astype(np.int64),
                 "attention_mask": attention_mask.numpy().astype(np.int64)}
        one_token = self.step_session is not None and tuple(input_ids.shape) == (1, 1)
        session = self.step_session if one_token else self.session
        if past and not isinstance(past[0], np.ndarray):
            return self._bound_step(session, feeds, past)
        feeds.update(zip(self.cache_names, past, strict=True))
        logits, *present = session.run(self.output_names, feeds)
        if self.decision_units:
            self._count(present.pop(), feeds["attention_mask"])
        return torch.from_numpy(logits), present

    def _bound_step(self, session, feeds: dict, past: list):
        if self._bindings.get(id(session), (None,))[0] is not session:
            self._bindings[id(session)] = (session, session.io_binding())
        binding = self._bindings[id(session)][1]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.cache_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # the outputs that leave ORT: logits and decisions
        for name in self.output_names[1:]:
            binding.bind_output(name, "cpu" if name == DECISIONS else self.device)
        session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        if self.decision_units:
            self._count(present.pop().numpy(), feeds["attention_mask"])
        return torch.from_numpy(logits.numpy()), present

    def _count(self, decisions: np.ndarray, attention_mask) -> None:
        """Add one step's decisions ``[U, B, T]`` (executed real tokens) to the per-unit counters."""
        mask = np.asarray(attention_mask)
        self.executed += decisions.reshape(decisions.shape[0], -1).sum(axis=1)
        self.tokens += int((mask[:, mask.shape[1] - decisions.shape[2]:] != 0).sum())

    def reset_stats(self) -> None:
        self.executed = np.zeros(len(self.decision_units), dtype=np.int64)
        self.tokens = 0  # real new tokens: each unit decided on every one

    def execute_fraction(self) -> float | None:
        """Executed / real tokens over every routed unit since ``reset_stats``; None where the file
        reports no decisions (dense routing, or an export without the ``decisions`` output)."""
        if not self.decision_units or not self.tokens:
            return None
        return float(self.executed.sum()) / (self.tokens * len(self.decision_units))

    def execute_fractions(self) -> dict[str, float | None]:
        return {name: (float(n) / self.tokens if self.tokens else None)
                for name, n in zip(self.decision_units, self.executed, strict=True)}


def routing_digest(routed) -> str:
    h = hashlib.sha256()
    for name, t in sorted(routed.routing_state().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def load_or_export_decode(routed, onnx_dir: str | Path | None, config: OnnxDecodeConfig, *, log=print) -> OrtDecoder:
    """The ONNX decode export of ``routed`` in ``onnx_dir`` (default: the irc cache), exported if missing."""
    from irc.cache import cache_dir

    digest = routing_digest(routed)
    if onnx_dir is None:
        key = hashlib.sha256(f"{routed.base.weights_sha256}{digest}{routed.plan.to_dict()}{config.cache_key()}"
                             .encode())
        onnx_dir = cache_dir("onnx-decode", key.hexdigest()[:16])
    onnx_dir = Path(onnx_dir)
    manifest = onnx_dir / f"{FILE}.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if (m.get("routing_sha256") == digest and m.get("routing") == config.routing
                and m.get("revision", 1) == REVISION
                and m.get("config", {}).get("branches", False) == config.branches
                and m.get("config", {}).get("decisions", False) == config.decisions
                and m.get("config", {}).get("grouped_attention", False) == config.grouped_attention
                and m.get("config", {}).get("step_file", False) == config.step_file):
            log(f"onnx        reusing {onnx_dir / FILE} (verified at export)")
            return OrtDecoder(onnx_dir)
    log(f"onnx        exporting the decode step to {onnx_dir / FILE} (once)")
    export_decode(routed, onnx_dir, config, log=log)
    return OrtDecoder(onnx_dir)
