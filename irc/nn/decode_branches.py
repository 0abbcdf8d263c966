"""Decode-step units with real branches: ``torch.cond``, which ``torch.onnx.export`` lowers to ONNX ``If``.

A graph exported branch-free computes a routed unit's body *and* its forecaster
for every new token and selects (``sparse=False``). With ``branches`` set on a
decode-graph unit (``irc.exporters.onnx_decode`` sets it for the export), the
work sits behind conditions on the routing decision instead; ONNX Runtime runs
only the taken branch of an ``If``, so an approximated token reads none of the
unit's skipped weights::

    routed (threshold), execute [B, T] = (margin ≥ θ | sink) & real:
        kv part (attention: every new token's keys and values, cache written outside any branch)
        If any(execute):
            If all(execute):  the unit on every token                     (batch 1: an executed token)
            else:             the executed tokens gathered, run, scattered; the forecast elsewhere
        else:                 the forecaster only                          (batch 1: an approximated token)

    routed, the step file (B = T = 1 static, ``one_token``): the same kv part, then one If
        If execute:   the unit
        else:         the forecaster

    folded (forecast):
        the forecaster on every token
        If any new token is a sink:  the unit on the sink slots (FoldedUnit._sinks)
        else:                        the cache passed through (no kv, no query part)

"Gathered" is per unit kind: an MLP runs its K executed tokens of the flattened
batch (``NonZero`` → gather → scatter), attention runs the R rows holding an
executed token (their queries, keys, values and mask gathered on the batch axis)
and blends within those rows: at T = 1 (decoding) R is the executed rows, so
FLOPs scale with them; a prompt (T > 1) runs every token of such a row.

Why ``torch.cond`` rather than ``If`` nodes spliced into the ONNX graph after
export: with torch 2.13 / onnxscript 0.7 ``torch.export`` traces it (closures
over parameters are lifted to operands), the dynamo ONNX exporter lowers it to
``If`` with inlined subgraphs that read outer-scope values by name, nested
``cond`` and data-dependent shapes (``nonzero``) inside a branch included, and
the same module code runs eagerly in PyTorch, so the branches are tested against
the sparse path without ONNX. Splicing would need a second export per unit and
hand-renaming of values across graph boundaries. Two costs, both handled here or
in the exporter: operands must be tensors and a branch may not close over a
SymInt (sizes are re-derived inside, ``_extras_back``); dynamo traces a branch
with fresh sizes and records example-only shape asserts, which
``irc.exporters.onnx_decode`` drops before lowering. Calling the ``cond``
operator directly (make_fx tracing, no dynamo) avoids the asserts but fails in
the ONNX exporter's functionalisation when a branch reads a parameter.

Why not skip without ``If`` at batch 1, by gathering the K ∈ {0, 1} executed rows (a MatMul over
zero rows reads no weights)? Measured on the 20%-FLOP folded SmolLM2's step file, every unit
gathered and no ``If``: 0.84× dense all-exec and 1.61× none-exec, against 0.97× and 1.85×
behind ``If`` (one step at P = 256, 10th percentile of interleaved blocks): the unit's ops
still run on empty tensors, and the gathers and scatters cost more than the ``If``.

Legend: B batch, T new tokens, R rows with an executed token, K executed tokens, D hidden.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from irc.nn.tokens import HIDDEN, subset_args
from irc.ops import token_gather, token_scatter


def routed_step(unit, a: torch.Tensor, extras: tuple, execute: torch.Tensor, pad: torch.Tensor):
    """A ``CachedRoutedUnit``'s output (and present cache) for decisions ``execute [B, T]``, branched."""
    cache, kv = (), ()
    if unit.kind == "attn":
        k, v, *cache = unit.kv(*subset_args(unit.kv_roles, a, extras))  # every new token's keys and values
        kv = (k, v)
    roles, outer = [unit.body_roles, unit.query_roles or []], extras

    def every(a, execute, pad, *rest):  # the unit as captured, minus the kv part already run
        extras, named = _operands_back(unit, rest, a, roles, outer)
        if unit.kind == "mlp":
            return unit.body(*subset_args(unit.body_roles, a, extras))
        return unit.query(*subset_args(unit.query_roles, a, extras, named=named))

    def mixed(a, execute, pad, *rest):
        extras, named = _operands_back(unit, rest, a, roles, outer)
        approx = unit._approximate(a, pad & ~execute)  # [B, T, D], 0 on executed tokens and padding
        if unit.kind == "mlp":
            return _gathered_tokens(unit, a, extras, execute, approx)
        return gathered_rows(unit, a, extras, named, execute, approx)

    def some(a, execute, pad, *rest):
        return torch.cond(execute.all(), every, mixed, (a, execute, pad, *rest))

    def none(a, execute, pad, *rest):
        return unit._approximate(a, pad)

    operands = _operands(a, execute, pad, *_tensors(extras), *kv)
    if one_token(a):  # the step file (B = T = 1, static): one If on the token's decision
        out = torch.cond(execute.reshape(()), every, none, operands)
    else:
        out = torch.cond(execute.any(), some, none, operands)
    return unit._with_cache(out, tuple(cache))


def one_token(a: torch.Tensor) -> bool:
    """``a [B, T, D]`` is statically one token (B = T = 1 as plain ints, not traced sizes): the
    single-token decode file (``OnnxDecodeConfig.step_file``), where executing any and all agree."""
    B, T = a.shape[0], a.shape[1]
    return type(B) is int and type(T) is int and B == 1 and T == 1


def folded_step(unit, a, out, full, sinks, extras):
    """A forecast-folded unit's output with the sink-slot work behind ``any(sinks)``."""
    roles = [unit.kv_roles or [], unit.query_roles or [], unit.body_roles]

    def with_sinks(a, out, full, sinks, *rest):
        return unit._sinks(a, out, full, sinks, _extras_back(rest, a, roles, extras))

    def without(a, out, full, sinks, *rest):
        cache = unit._cache_without_sinks(_extras_back(rest, a, roles, extras), full.shape[1], a.shape[1])
        return unit._with_cache(out.clone(), cache)

    result = torch.cond(sinks.any(), with_sinks, without, _operands(a, out, full, sinks, *_tensors(extras)))
    return tuple(result) if unit.cache is not None else result


def _operands(*tensors: torch.Tensor) -> tuple:
    """``torch.cond`` operands: a tensor of static sizes but traced strides (``[1, 1]`` sliced off
    ``[1, P + 1]`` in the single-token file) copied to plain strides, which dynamo can hash."""
    return tuple(t.clone(memory_format=torch.contiguous_format) if all(type(n) is int for n in t.shape) and not all(type(n) is int for n in t.stride())
                 else t for t in tensors)


# torch.cond takes tensor operands only, and a branch may not close over a SymInt (the trace fails):
# the unit's size inputs are re-derived inside the branch from the operands' shapes, by their roles.

def _tensors(extras) -> tuple:
    return tuple(e for e in extras if isinstance(e, torch.Tensor))


def _extras_back(tensors, a, roles, extras) -> list:
    """The unit's extra inputs inside a branch: its tensor operands, and its sizes read off ``a [B, T, D]``."""
    kinds = {r.source: r.kind for rs in roles for r in rs if not isinstance(r.source, str)}
    it, out = iter(tensors), []
    for i, e in enumerate(extras):
        if isinstance(e, torch.Tensor):
            out.append(next(it))
        elif kinds.get(i) == "batch":
            out.append(a.shape[0])
        elif kinds.get(i) == "seq":
            out.append(a.shape[1])
        else:  # a static value, or the key count a folded unit replaces (CONTEXT) before any op reads it
            out.append(e)
    return out


def _operands_back(unit, rest, a, roles, extras):
    """A routed unit's branch operands after (a, execute, pad): extra inputs, then attention's k and v."""
    if unit.kind == "mlp":
        return _extras_back(rest, a, roles, extras), None
    return _extras_back(rest[:-2], a, roles, extras), {"k": rest[-2], "v": rest[-1]}


def _gathered_tokens(unit, a, extras, execute, approx):
    """MLP: the body on the K executed tokens of the flattened batch, the forecast elsewhere."""
    B, T, D = a.shape
    rows = execute.reshape(-1).to(torch.float32).nonzero().squeeze(1)  # [K]; a float key (TensorRT's NonZero)
    a_sel = token_gather(a.reshape(B * T, D), rows).unsqueeze(0)  # [1, K, D]
    u = unit.body(*subset_args(unit.body_roles, a_sel, extras, flat=rows.shape[0]))  # [1, K, D]
    return token_scatter(approx.reshape(B * T, D), u.reshape(-1, D).to(approx.dtype), rows).view(B, T, D)


def gathered_rows(unit, a, extras, named, execute, approx):
    """Attention: the query part on the R rows holding an executed token; blended within them."""
    B, T, D = a.shape
    rows = execute.any(dim=1).to(torch.float32).nonzero().squeeze(1)  # [R]
    R = rows.shape[0]
    args = subset_args(unit.query_roles, a, extras, named=named)
    args = [_batch_rows(role, value, rows, B, R) for role, value in zip(unit.query_roles, args, strict=True)]
    u = unit.query(*args).to(approx.dtype)  # [R, T, D]
    mine = approx.index_select(0, rows)  # [R, T, D]
    u = torch.where(execute.index_select(0, rows).unsqueeze(-1), u, mine)
    return token_scatter(approx.reshape(B, T * D), u.reshape(R, T * D), rows).view(B, T, D)


def _batch_rows(role, value, rows, B, R):
    """An outlined input restricted to batch rows ``rows [R]``: sizes become R, batch-major tensors gathered."""
    if role.kind == "batch":
        return R
    if isinstance(value, torch.Tensor) and value.dim() > 0 and (role.source == HIDDEN or
                                                                guard_or_false(value.shape[0] == B)):
        return value.index_select(0, rows)  # a [1, ...] broadcast input stays as it is
    return value
