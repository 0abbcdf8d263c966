"""The routed decode-step graph of a routed model, sharing the model's routing weights.

``decoder_for(routed)`` captures the base model's decode step
(``irc.generation.capture``), applies the pipeline ``irc.route`` applies to the
prefill graph (the same passes, the same plan), and then *ties* every routed
unit of the new graph to the prefill graph's unit of the same name: the router,
the forecaster, the LoRA deltas and the threshold tensor become the very same
objects. The base weights are tied by name too (both captures usually read
the base model's parameters already). So a routed directory loaded with ``irc.load`` generates
with the weights it was trained and calibrated with, and training or
calibrating the prefill graph afterwards moves the decode graph too.

The routing *settings* (mode, sparse, capacity, ...) are copied from the
prefill units at every ``Decoder.sync()``; the execute counters stay separate, so
they count the decoded tokens only.

Folded units (``plan.folded``) are folded in the decode graph by the same pass,
their forecasters and LoRA deltas tied likewise; a model folded after its
decoder was built (``RoutedModel.fold``) has the decoder folded to match at the
next ``decoder_for``. A forecast-folded attention unit keeps its KV cache at its
sink slots only (``irc.passes.compact_sink_caches``): its past and present hold
min(n_sink, P) and min(n_sink, P+T) positions, not P and P+T; ``cache_slots()``
says which cache tensors are so, ``kv_cache_bytes`` what that saves. A plain-folded
unit runs inline (``irc.passes.inline_plain_folds``): its norm and body ops are the
step graph's own, as in the dense decode graph, with no module calls per step.

The cache appends of the graph write in place into a static cache
(``irc.passes.static_kv_cache``, ``irc.generation.static_cache``):
``empty_cache(B, capacity=M)`` returns views of preallocated ``[B, Hkv, M, hd]``
buffers (sink-slot layers excepted) and ``step`` writes each step's new keys and
values there instead of copying the past; ``empty_cache(B)`` is the copying cache.
Grouped-query attention reads the cache's Hkv heads directly
(``irc.passes.grouped_kv_attention``), not an n_rep-fold copy made every step.

The dense baseline is ``dense_decoder(routed)``: the base model's decode step through
the same machinery (static cache, grouped-query attention), with no routed or folded
unit. ``decoder_for(routed)`` in ``dense`` mode is not it for a folded model: every
routed unit runs, but a folded unit is a compile-time specialisation that ignores the
mode, so a forecast-folded unit still forecasts and keeps its sink-slot cache (the
routed model with its routers off, not the model it was made from).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from irc.errors import UserError
from irc.generation import row_kernels, static_cache
from irc.generation.capture import cache_shape, capture_decode, empty_cache
from irc.nn.cached_unit import RowsHint, StepHint
from irc.passes.compact_sink_caches import compact_sink_caches, compacted_slots
from irc.passes.drop_noop_conversions import drop_noop_conversions
from irc.passes.fold_static_routes import fold_static_routes
from irc.passes.grouped_kv_attention import grouped_kv_attention
from irc.passes.inline_plain_folds import inline_plain_folds
from irc.passes.pipeline import run_passes
from irc.passes.route_decoder_blocks import folded_modules, route_decoder_blocks, routed_modules
from irc.passes.static_kv_cache import restore_cat, static_kv_cache

_SETTINGS = ("mode", "sparse", "tau", "capacity", "record")
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DENSE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# after folding: forecast-folded attention keeps a KV cache of the sink slots only, not of every token;
# plain units run inline, as in the dense decode graph (no module calls per unit and step)
_FOLD_PASSES = [
    ("compact_sink_caches", compact_sink_caches),
    ("inline_plain_folds", inline_plain_folds),
]
# the last passes of every decode graph, routed or dense (the same cache machinery on both sides)
_CACHE_PASSES = [
    # the cache appends write in place when the past is a static buffer's view (else: cat, as captured)
    ("static_kv_cache", static_kv_cache),
    # grouped-query attention reads the cache's own heads, no n_rep-fold copy per step (exports too)
    ("grouped_kv_attention", grouped_kv_attention),
]


@dataclass
class Decoder:
    """``step(ids, mask, past) -> (logits, present)`` through the routed decode graph."""

    gm: GraphModule
    routed: object  # the RoutedModel whose prefill units this graph's units are tied to
    capture_seconds: float

    @property
    def units(self) -> dict[str, torch.nn.Module]:
        return routed_modules(self.gm)

    def sync(self) -> None:
        """Copy the prefill units' routing settings onto the decode units."""
        for name, unit in self.units.items():
            source = self.routed.units[name]
            for attr in _SETTINGS:
                setattr(unit, attr, getattr(source, attr))
            unit.keep = None

    def reset_stats(self) -> None:
        for unit in self._unit_list():  # folded units too: their counters are not reported, only reset
            unit.reset_stats()

    def execute_fraction(self) -> float | None:
        """Executed / real tokens over every routed unit since the last ``reset_stats``."""
        executed = sum(u.executed for u in self.units.values())
        tokens = sum(u.tokens for u in self.units.values())
        return executed / tokens if tokens else None

    def execute_fractions(self) -> dict[str, float | None]:
        return {name: u.execute_fraction for name, u in self.units.items()}

    def empty_cache(self, batch: int, device="cpu", capacity: int | None = None) -> list[torch.Tensor]:
        """Length-0 past keys and values: right for full-length and sink-slot layers alike.

        ``capacity`` M: a static cache, each full-length tensor a view of a preallocated
        ``[B, Hkv, M, hd]`` buffer that steps write in place (``irc.generation.static_cache``);
        None: the copying cache (every step returns new tensors).
        """
        config, dtype = self.routed.base.model.config, self.routed.base.dtype
        if capacity is None:
            return empty_cache(config, batch, dtype, device)
        _, kv_heads, head_dim = cache_shape(config)
        return [empty_cache(config, batch, dtype, device)[0] if slots is not None else
                static_cache.allocate(batch, kv_heads, capacity, head_dim, dtype, device)
                for slots in self.cache_slots()]

    def cache_slots(self) -> list[int | None]:
        """Per cache tensor: its sink slots where it keeps only those, None where it grows with the context."""
        return compacted_slots(self.gm, 2 * cache_shape(self.routed.base.model.config)[0])

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor]):
        """Logits ``[B, T, V]`` of the T new tokens and the present cache (past + T tokens)."""
        hint = None
        if tuple(input_ids.shape) == (1, 1):  # one token at batch 1: tell every unit once
            row = attention_mask[0] != 0  # [P + 1]
            hint = StepHint(mask_len=row.shape[0], real=bool(row[-1]), real_before=int(row[:-1].sum()))
        elif input_ids.shape[1] == 1:  # one token in each of B rows
            hint = RowsHint.of(attention_mask)
        units = self._unit_list()
        for unit in units:
            unit.step_hint = hint
        try:
            with row_kernels.for_rows(input_ids.numel(), self.aten_rows()):
                logits, *present = self.gm(input_ids, attention_mask, *past)
        finally:
            for unit in units:
                unit.step_hint = None
        return logits, static_cache.adopt(past, present)  # a rebuilt present back into its static buffer

    def aten_rows(self) -> int:
        """Steps of at most this many tokens in all run with oneDNN off (``irc.generation.row_kernels``):
        bf16 on the CPU, where ATen's own kernel measured faster; else 0. Measured on the base model's
        weights, so a routed decoder and its dense baseline (``dense_decoder``) take the same kernels."""
        if getattr(self, "_aten_rows", None) is None:
            self._aten_rows = row_kernels.aten_rows(self.routed.base.model.parameters())
        return self._aten_rows

    def reset_kernels(self) -> None:
        """Forget the kernel choice: the next step chooses again (after ``IRC_DECODE_GEMM`` changed)."""
        self._aten_rows = None

    def _unit_list(self) -> list:
        if getattr(self, "_units", None) is None:
            self._units = [*self.units.values(), *folded_modules(self.gm).values()]
        return self._units


def decoder_for(routed) -> Decoder:
    """The decode graph of ``routed``, built once per routed model (a few seconds)."""
    decoder = _DECODERS.get(routed.gm)
    if decoder is None:
        decoder = build_decoder(routed)
        decoder.aten_rows()  # the step kernels, measured now rather than inside the first (timed) step
        _DECODERS[routed.gm] = decoder
    pending = {name: how for name, how in routed.plan.folded if name not in folded_modules(decoder.gm)}
    if pending:  # folded after the decoder was built
        restore_cat(decoder.gm)  # fold_static_routes reads a unit's cache appends as cat(past, new)
        run_passes(decoder.gm, [("fold_static_routes", lambda g: fold_static_routes(g, pending)),
                                *_FOLD_PASSES, *_CACHE_PASSES])
        _tie(decoder.gm, routed)
        decoder._units = None
    decoder.sync()
    return decoder


def dense_decoder(routed) -> Decoder:
    """The base model's decode step, for the dense side of a comparison (see the module doc):
    no routed or folded unit, the same static cache and grouped-query attention as
    ``decoder_for(routed)``. Built once per routed model."""
    decoder = _DENSE.get(routed.gm)
    if decoder is None:
        start = time.perf_counter()
        gm = capture_decode(routed.base.model).gm
        run_passes(gm, [("drop_noop_conversions", drop_noop_conversions), *_CACHE_PASSES])
        decoder = Decoder(gm=gm, routed=routed, capture_seconds=time.perf_counter() - start)
        decoder.aten_rows()
        _DENSE[routed.gm] = decoder
    return decoder


def build_decoder(routed) -> Decoder:
    if routed.plan.variant in ("mod", "static"):
        raise UserError(f"generation with the {routed.plan.variant!r} variant (whole routed layers) is not "
                        "supported; generate with an informed or skip model")
    start = time.perf_counter()
    captured = capture_decode(routed.base.model)
    gm = captured.gm
    passes = [
        ("drop_noop_conversions", drop_noop_conversions),
        ("route_decoder_blocks", lambda g: route_decoder_blocks(g, routed.plan)),
    ]
    if routed.plan.folded:
        passes += [("fold_static_routes", lambda g: fold_static_routes(g, dict(routed.plan.folded))), *_FOLD_PASSES]
    run_passes(gm, passes + _CACHE_PASSES)
    _tie(gm, routed)
    return Decoder(gm=gm, routed=routed, capture_seconds=time.perf_counter() - start)


def _tie(gm: GraphModule, routed) -> None:
    prefill = routed.units
    decode = routed_modules(gm)
    if list(decode) != list(prefill):
        raise RuntimeError(f"the decode graph's routed units {list(decode)[:4]}… differ from the prefill "
                           f"graph's {list(prefill)[:4]}…")
    for name, unit in decode.items():
        source = prefill[name]
        unit.router = source.router
        unit.forecaster = source.forecaster
        unit.threshold = source.threshold  # a registered buffer: the same tensor object
        if getattr(source, "lora", None) is not None:
            _tie_lora(unit, source)
    folded, prefill_folded = folded_modules(gm), routed.folded
    if list(folded) != list(prefill_folded):
        raise RuntimeError(f"the decode graph's folded units {list(folded)[:4]}… differ from the prefill "
                           f"graph's {list(prefill_folded)[:4]}…")
    for name, unit in folded.items():
        source = prefill_folded[name]
        unit.forecaster = source.forecaster
        if getattr(source, "lora", None) is not None:
            _tie_lora(unit, source)
    _tie_parameters(gm, routed.gm)


def _tie_parameters(gm: GraphModule, prefill: GraphModule) -> None:
    """Every parameter of ``gm`` becomes the prefill graph's parameter of the same name.

    Both graphs name them alike (``layer0_attn.body.q_proj.weight``, ``m.lm_head.weight``);
    usually they already are the base model's tensors, but a copied prefill graph owns its own.
    """
    theirs = dict(prefill.named_parameters(remove_duplicate=False))
    for name, mine in list(gm.named_parameters(remove_duplicate=False)):
        source = theirs.get(name)
        if source is None or source is mine or source.shape != mine.shape:
            continue
        owner_path, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(owner_path) if owner_path else gm, leaf, source)


def _tie_lora(unit, source) -> None:
    """Point every LoRA parametrization of the decode unit's parts at the prefill unit's deltas."""
    for part in ("body", "kv", "query"):
        gm = getattr(unit, part, None)
        if gm is None:
            continue
        for target, delta in source.lora.items():
            owner = getattr(gm, target, None)
            if owner is not None and hasattr(owner, "parametrizations"):
                owner.parametrizations.weight[0] = delta
    unit.lora = source.lora


def cache_layout(config) -> dict:
    layers, kv_heads, head_dim = cache_shape(config)
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "tensors": 2 * layers}
