"""Fold the routed units whose route is (almost) constant into plain or forecast-only units.

On held-in data most routers make a static choice: a unit either approximates
(nearly) every token or executes (nearly) every one. Such a unit pays for a
router, a decision, gathers and scatters, and data-dependent shapes, for nothing.
This pass replaces the named ``RoutedUnit`` s by ``FoldedUnit`` s that hold the
same outlined parts and forecaster (the same modules and weights, LoRA included):

- ``plain``: every token executes; the unit as captured, no router;
- ``forecast``: every non-sink token takes the forecaster; the sinks (the first
  ``n_sink`` real tokens, which a routed unit always executes) run the unit on
  their S = min(n_sink, T) slots only; attention computes no keys, values or
  queries for the other tokens.

Before::                                        After::

    layer0_attn = call_module[layer0_attn](         layer0_attn = call_module[layer0_attn](
        x, attention_mask, B, T, cos, sin, mask)        x, attention_mask, B, T, cos, sin, mask)
    # RoutedUnit: norm, router, kv (all T),         # FoldedUnit(forecast): norm, forecaster,
    #   query (executed), forecaster, scatter       #   kv and query on the S sink slots
    add_7 = add(x, layer0_attn)                     add_7 = add(x, layer0_attn)

The graph keeps its nodes (same names, same call arguments); the module a call
reaches changes. Why this is exact: a routed unit in ``threshold`` mode whose
margin is below θ for every non-sink token computes exactly the ``forecast``
unit's output (sinks execute either way; a sink attends only to earlier real
tokens, all sinks, so its attention over the sink slots equals its row of the
full attention), and one whose margin is at or above θ everywhere computes the
``plain`` unit's output on every real token. Where the routed unit decided
otherwise for some tokens, the fold changes those tokens' outputs only, and
(through attention and later layers) what depends on them.

``choose_folds`` picks the units from measured execute fractions.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Node

from irc.errors import UserError
from irc.nn.folded_unit import CONTEXT, HOWS, FoldedUnit
from irc.nn.routed_unit import RoutedUnit
from irc.nn.tokens import HIDDEN, ArgRole
from irc.passes.result import PassResult

log = logging.getLogger("irc.passes")

CAT = torch.ops.aten.cat.default


def fold_static_routes(gm: GraphModule, folds: dict[str, str]) -> PassResult:
    """Replace each routed unit ``name`` in ``folds`` by a ``FoldedUnit`` running ``folds[name]``
    (``"forecast"`` or ``"plain"``); units already folded the same way are left as they are."""
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    folded: dict[str, str] = {}
    for name, how in folds.items():
        if how not in HOWS:
            raise UserError(f"{name}: a unit folds to one of {', '.join(HOWS)}, got {how!r}")
        unit = getattr(gm, name, None) if name in calls else None
        if isinstance(unit, FoldedUnit):
            if unit.how != how:
                raise UserError(f"{name} is already folded to {unit.how!r}; its router is gone, so it cannot "
                                f"be re-folded to {how!r} (re-load the routed model without that fold)")
            continue
        if not isinstance(unit, RoutedUnit):
            routed = [t for t, n in calls.items() if isinstance(getattr(gm, t, None), RoutedUnit)]
            raise UserError(f"no routed unit {name!r} to fold; routed units: {', '.join(routed[:6])}"
                            f"{'…' if len(routed) > 6 else ''}")
        call = calls[name]
        gm.add_submodule(name, _fold(gm, call, unit, how))
        call.meta["nn_module_stack"] = {name: (name, FoldedUnit.__name__)}
        folded[name] = how
    gm.graph.lint()
    gm.recompile()
    stats = {"folded": folded, "forecast": sum(h == "forecast" for h in folded.values()),
             "plain": sum(h == "plain" for h in folded.values())}
    log.info("fold_static_routes: %d units folded (%d forecast, %d plain)", len(folded), stats["forecast"],
             stats["plain"])
    return PassResult(gm, bool(folded), stats)


def choose_folds(execute_fractions: dict[str, float | None], epsilon: float, *,
                 savings: dict[str, float] | None = None, min_saving: float = 0.0) -> dict[str, str]:
    """Units to fold from their execute fractions: ``≤ ε`` → ``forecast``, ``≥ 1 − ε`` → ``plain``;
    with ``savings`` (unit → the share of the dense model's FLOPs per token its route saves at its
    fraction, ``irc.eval.flops.route_saving``), also ``plain`` where that is under ``min_saving``.

    A fraction is of the **non-sink** real tokens a unit executed on held-in data in
    ``threshold`` mode (``irc.train.fold.held_in_fractions`` measures it): the tokens
    whose decision the fold fixes, since sinks execute either way. ``ε`` is then the
    largest share of those decisions a fold may flip. (The units' raw counters,
    ``RoutedModel.execute_fractions()``, count the sinks as executed: a unit that
    forecasts every non-sink token reports about n_sink / T there, 0.4% at 4 sinks
    and T = 1024; they only work here with ε well above that.) Units without a
    measurement (``None``) are not folded.

    ``min_saving`` is for decoding: a route whose unit is cheap to run, or that skips it
    rarely, saves less than its router and branch cost per decoded token (on a 2-core CPU
    about 0.1 ms of a 40-ms SmolLM2-135M step, some 0.25% of the step: an attention unit
    executing 85% of its tokens saves 0.08% of the FLOPs). Such a unit is folded plain: it
    always runs, the FLOPs its route saved are given up (recalibration moves them onto the
    routes that remain), and the decode step loses a router and a branch.
    """
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"epsilon must be in [0, 0.5), got {epsilon}")
    if not 0.0 <= min_saving < 1.0:
        raise ValueError(f"min_saving must be in [0, 1), got {min_saving}")
    folds = {}
    for name, fraction in execute_fractions.items():
        if fraction is None:
            continue
        if fraction <= epsilon:
            folds[name] = "forecast"
        elif fraction >= 1.0 - epsilon:
            folds[name] = "plain"
        elif savings is not None and min_saving > 0 and savings[name] < min_saving:
            folds[name] = "plain"
    return folds


def _fold(gm: GraphModule, call: Node, unit: RoutedUnit, how: str) -> FoldedUnit:
    kv_roles = cache = None
    if unit.kind == "attn" and how == "forecast":
        kv_roles = _sink_kv_roles(gm, call, unit)
        cache = _cache_layout(unit)
    folded = FoldedUnit(
        kind=unit.kind,
        layer=unit.layer,
        how=how,
        norm=unit.norm,
        body=unit.body,
        body_roles=unit.body_roles,
        forecaster=unit.forecaster,
        n_sink=unit.n_sink,
        kv=getattr(unit, "kv", None),
        kv_roles=kv_roles,
        query=getattr(unit, "query", None),
        query_roles=unit.query_roles,
        cache=cache,
    )
    folded.threshold = unit.threshold.new_zeros(())  # ignored; on the unit's device
    if getattr(unit, "lora", None) is not None:
        folded.lora = unit.lora  # the parts' parametrizations already read these deltas
    return folded


def _sink_kv_roles(gm: GraphModule, call: Node, unit: RoutedUnit) -> list[ArgRole]:
    """Roles of the kv part's inputs when it runs on the sink slots only.

    The routed unit runs kv on every token (all its roles ``full``); restricted to
    the sinks, an input takes the role the same input has in the whole attention
    (``body_roles``: rotary tables gathered, sizes set to S), and the key count of a
    decode graph (past + new tokens, P + T) becomes P + S.
    """
    body_role = {r.source: r for r in unit.body_roles}
    extras = call.args[2:]
    seq, past = _symbols(gm)
    roles = []
    for r in unit.kv_roles:
        if r.source == HIDDEN:
            roles.append(ArgRole(HIDDEN, "tokens", (1,)))
            continue
        role = body_role[r.source]
        val = extras[r.source].meta.get("val") if isinstance(extras[r.source], Node) else None
        if role.kind == "query_mask":
            raise UserError(f"{call.target}: its key/value path reads the attention mask; cannot run it "
                            "on the sink tokens only (fold it to 'plain' or keep it routed)")
        if role.kind == "full" and isinstance(val, torch.SymInt) and seq is not None:
            expr = val.node.expr
            if past is not None and expr == past + seq:
                role = ArgRole(r.source, CONTEXT)
            elif seq in expr.free_symbols:
                raise UserError(f"{call.target}: its key/value path reads a size {val} that depends on the "
                                "sequence length in a way the fold cannot restrict to the sink tokens")
        roles.append(role)
    return roles


def _symbols(gm: GraphModule):
    """The capture's sequence-length symbol and, in decode graphs, the past-length one."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ids = placeholders[0].meta.get("val")
    seq = _expr(ids.shape[1]) if isinstance(ids, torch.Tensor) else None
    past = None
    if gm.meta.get("irc_capture", {}).get("cache_tensors", 0) and len(placeholders) > 2:
        cache = placeholders[2].meta.get("val")
        past = _expr(cache.shape[2]) if isinstance(cache, torch.Tensor) else None
    return seq, past


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else None


def _cache_layout(unit: RoutedUnit) -> tuple[tuple[int, int], ...] | None:
    """Decode graphs: per present output of kv, (extra input with the past, axis of the cat)."""
    outputs = unit.kv.graph.output_node().args[0]
    present = outputs[2:] if isinstance(outputs, (tuple, list)) else ()
    if not present:
        return None
    placeholders = [n for n in unit.kv.graph.nodes if n.op == "placeholder"]
    layout = []
    for node in present:
        parts = node.args[0] if node.op == "call_function" and node.target == CAT else None
        if not parts or len(parts) != 2 or parts[0] not in placeholders:
            raise UserError(f"layer{unit.layer}_attn: its cache output {node.name} is not cat(past, new); "
                            "cannot fold it to 'forecast' (fold it to 'plain' or keep it routed)")
        source = unit.kv_roles[placeholders.index(parts[0])].source
        axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ndim = parts[0].meta["val"].dim()
        layout.append((source, axis % ndim))
    return tuple(layout)
