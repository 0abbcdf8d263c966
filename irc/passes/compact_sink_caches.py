"""Keep the KV cache of forecast-folded attention units at their sink slots (decode graphs).

A forecast-folded attention unit (``FoldedUnit``, ``how="forecast"``) computes keys
and values for its sinks only, and only sinks query it. Without this pass its
cache is full length anyway, zeros for every non-sink token. After it, the unit's
past and present hold the sinks alone::

    past_{2l}, past_{2l+1}        [B, Hkv, min(n_sink, P), hd]     (P = attention_mask length − T)
    present_{2l}, present_{2l+1}  [B, Hkv, min(n_sink, P+T), hd]

slot j of row b holding row b's j-th real token (left padding has no slot; slots
beyond a row's real tokens hold zeros and are masked). The cache of such a layer
stops growing once a row has n_sink real tokens: no KV memory per token.

Before::                                            After::

    past_0 = placeholder                                past_0 = placeholder     # [B, Hkv, Ps, hd]
    _guards_fn(input_ids, mask, past_0, .., past_3)     _guards_fn(input_ids, mask, past_2, .., past_3)
    sym_size_26 = sym_size.int(past_0, 2)               sym_size_26 = sub(sym_size.int(mask, 1),
                                                                          sym_size.int(input_ids, 1))
    layer0_attn = call_module[layer0_attn](             layer0_attn = call_module[layer0_attn](...)
        x, mask, .., past_0, past_1)                    # the same call; FoldedUnit.compact = True

Why this is valid:

- the folded unit is the only reader of its past tensors' values (a layer whose
  past has any other user but a size read is left full length);
- the captured model reads the past length P (positions, ``cache_position``, the
  causal mask) from *some* layer's cache, whichever export chose (not always layer
  0); every such read of a compacted past becomes ``mask length − T``, which is P
  wherever the graph ran before (its guards demanded ``mask length == P + T``);
- export's guards (``_guards_fn``) check every past against one shared length P;
  a compacted past is replaced there by a stand-in of length P: a full-length
  layer's past, or, where every layer is compact, a zero-stride view of the
  right shape. The other inputs keep every check they had. (The module's input
  pre-hook checks only the inputs' structure while ``_guards_fn`` exists; where
  torch has no ``_guards_fn``, the pre-hook checks shapes and is removed.)

Layers with ``n_sink < 2`` stay full length: a sink cache of at most one slot
would have a length export specialises (0 or 1), so the ONNX decode export could
not keep it dynamic. ``compacted_slots(gm)`` says which cache tensors are compact.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node

from irc.nn.folded_unit import FoldedUnit
from irc.passes.result import PassResult

log = logging.getLogger("irc.passes")

SYM_SIZE = torch.ops.aten.sym_size.int
META = "irc_sink_slots"  # gm.meta: {cache tensor index: n_sink} of the compacted cache tensors
MIN_SINKS = 2


def compact_sink_caches(gm: GraphModule) -> PassResult:
    """Give every forecast-folded attention unit of a decode graph a sink-slot cache (see the module doc)."""
    if not gm.meta.get("irc_capture", {}).get("cache_tensors", 0):
        return PassResult(gm, False, {"compacted": [], "skipped": {}})
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ids, mask, pasts = placeholders[0], placeholders[1], placeholders[2:]
    slots: dict[int, int] = dict(gm.meta.get(META, {}))
    compacted, skipped = [], {}
    for call in [n for n in gm.graph.nodes if n.op == "call_module"]:
        unit = getattr(gm, call.target)
        if not (isinstance(unit, FoldedUnit) and unit.kind == "attn" and unit.cache is not None) or unit.compact:
            continue
        sources = [(call.args[2 + source], axis) for source, axis in unit.cache]
        reason = _why_not(unit, call, sources, pasts)
        if reason:
            skipped[call.target] = reason
            log.info("compact_sink_caches: %s keeps a full-length cache: %s", call.target, reason)
            continue
        for node, axis in sources:
            for user in list(node.users):
                if user.op == "call_function" and user.target == SYM_SIZE and user.args[1] % _ndim(node) == axis:
                    _past_length_from_mask(gm, user, ids, mask)
            slots[pasts.index(node)] = unit.n_sink
        unit.compact = True
        compacted.append(call.target)
    if compacted:
        _point_guards_at_full_lengths(gm, placeholders, slots)
        gm.meta[META] = dict(sorted(slots.items()))
        gm.graph.lint()
        gm.recompile()
    log.info("compact_sink_caches: %d attention caches kept at their sink slots", len(compacted))
    return PassResult(gm, bool(compacted), {"compacted": compacted, "skipped": skipped})


def compacted_slots(gm: GraphModule, n_cache: int) -> list[int | None]:
    """Per cache tensor of a decode graph: its sink slots if compacted, else None (full length)."""
    slots = gm.meta.get(META, {})
    return [slots.get(i) for i in range(n_cache)]


def _why_not(unit: FoldedUnit, call: Node, sources: list[tuple[Node, int]], pasts: list[Node]) -> str | None:
    if unit.n_sink < MIN_SINKS:
        return f"n_sink={unit.n_sink} (< {MIN_SINKS}: export would specialise a cache of at most one slot)"
    for node, _ in sources:
        if not isinstance(node, Node) or node not in pasts:
            return f"its cache input {node} is not a past input of the graph"
        for user in node.users:
            if user is call or (user.op == "call_module" and user.target == "_guards_fn"):
                continue
            if user.op == "call_function" and user.target == SYM_SIZE:
                continue  # a size read: the length axis is re-derived from the mask, the others do not change
            return f"{node.name} is also read by {user.name}"
    return None


def _ndim(node: Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else 4  # [B, Hkv, P, hd]


def _past_length_from_mask(gm: GraphModule, size: Node, ids: Node, mask: Node) -> None:
    """Replace ``sym_size(past, axis)`` (P) by ``sym_size(mask, 1) − sym_size(input_ids, 1)``."""
    with gm.graph.inserting_after(size):
        context = gm.graph.call_function(SYM_SIZE, (mask, 1))
        with gm.graph.inserting_after(context):
            new = gm.graph.call_function(SYM_SIZE, (ids, 1))
            with gm.graph.inserting_after(new):
                length = gm.graph.call_function(operator.sub, (context, new))
    mask_val, ids_val = mask.meta.get("val"), ids.meta.get("val")
    if isinstance(mask_val, torch.Tensor) and isinstance(ids_val, torch.Tensor):
        context.meta["val"], new.meta["val"] = mask_val.shape[1], ids_val.shape[1]
    length.meta["val"] = size.meta.get("val")  # the same symbol P: later passes read sizes symbolically
    size.replace_all_uses_with(length)
    gm.graph.erase_node(size)


def _point_guards_at_full_lengths(gm: GraphModule, placeholders: list[Node], slots: dict[int, int]) -> None:
    """Give export's guard function a full-length stand-in for every compacted past (see the module doc)."""
    guards = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"), None)
    if guards is None:  # older torch: the input pre-hook checks the shapes itself, against one shared P
        for key, hook in list(gm._forward_pre_hooks.items()):
            if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
                del gm._forward_pre_hooks[key]
        return
    pasts = placeholders[2:]
    full = [p for i, p in enumerate(pasts) if i not in slots]
    if full:
        stand_in = full[0]
    else:
        with gm.graph.inserting_before(guards):
            stand_in = gm.graph.call_function(full_length_stand_in, (pasts[0], placeholders[1], placeholders[0]))
    old = [a for a in guards.args if a.op == "call_function"]  # an earlier run's stand-in
    guards.args = tuple(stand_in if i - 2 in slots else a for i, a in enumerate(guards.args))
    for node in old:
        if not node.users:
            gm.graph.erase_node(node)


def full_length_stand_in(past: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor):
    """A zero-stride ``[B, Hkv, P, hd]`` view with P = mask length − T: what a full-length past would be."""
    shape = list(past.shape)
    shape[2] = attention_mask.shape[1] - input_ids.shape[1]
    return past.new_zeros(()).expand(shape)
