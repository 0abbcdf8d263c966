"""Summaries of a routed graph: op counts, per-unit tables, the before/after diff."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from irc.eval.flops import folded_unit_flops, unit_flops


def op_counts(gm: GraphModule) -> dict[str, int]:
    """call_function targets by name (``linear``, ``scaled_dot_product_attention``, ...)."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            counts[name] = counts.get(name, 0) + 1
        elif n.op == "call_module" and not str(n.target).startswith("_guards"):
            counts["call_module"] = counts.get("call_module", 0) + 1
    return dict(sorted(counts.items()))


def unit_parts(unit: torch.nn.Module) -> dict[str, GraphModule]:
    """The outlined graphs a routed unit runs, by role (a folded unit: those it still runs)."""
    names = ("norm", "body", "kv", "query") if unit.kind == "attn" else ("norm", "body")
    how = getattr(unit, "how", None)
    if how == "plain":
        names = ("norm", "body")
    elif how == "forecast" and unit.kind == "attn":
        names = ("norm", "kv", "query")
    if unit.kind == "layer":
        names = ("block",)
    return {n: getattr(unit, n) for n in names if isinstance(getattr(unit, n, None), GraphModule)}


def graph_snapshot(routed) -> dict:
    """Op counts of the top-level graph and of every part of every routed (and folded) unit."""
    snapshot = {
        "top": op_counts(routed.gm),
        "units": {name: {part: op_counts(g) for part, g in unit_parts(u).items()}
                  for name, u in routed.units.items()},
    }
    folded = getattr(routed, "folded", {})
    if folded:
        snapshot["folded"] = {name: {"how": u.how, **{part: op_counts(g) for part, g in unit_parts(u).items()}}
                              for name, u in folded.items()}
    return snapshot


def node_diff(routed) -> list[tuple[str, int, int]]:
    """(op, count before the pass, count after it: top level plus inside the routed units' bodies)."""
    after = dict(op_counts(routed.gm))
    for unit in (*routed.units.values(), *getattr(routed, "folded", {}).values()):
        for part in ("norm", "body", "block"):
            if isinstance(getattr(unit, part, None), GraphModule):
                for op, c in op_counts(getattr(unit, part)).items():
                    after[op] = after.get(op, 0) + c
    before = routed.capture_op_counts
    return [(op, before.get(op, 0), after.get(op, 0)) for op in sorted(set(before) | set(after))
            if before.get(op, 0) != after.get(op, 0)]


@dataclass
class UnitRow:
    name: str
    layer: int
    kind: str
    routed: bool
    router_params: int
    lff_params: int
    dense_flops: float
    routed_flops: float
    folded: str | None = None  # "forecast" | "plain" for a folded unit (routed is False: no router)
    held_in_execute: float | None = None  # the execute fraction the fold was decided on
    structure: str = ""  # the unit structure the pass found: "pre-norm,post-norm", "pre-norm,moe", ...


def unit_table(routed, sparsity: float, seq_len: int) -> list[UnitRow]:
    """One row per unit of the model (routed, folded or neither), FLOPs per token at ``sparsity``."""
    arch, plan = routed.arch, routed.plan
    units = routed.units
    folded = getattr(routed, "folded", {})
    evidence = routed.records.get("fold", {}).get("held_in_execute", {})
    rows = []
    for layer in range(arch.n_layers):
        kinds = ("layer",) if plan.variant in ("mod", "static") else ("attn", "mlp")
        for kind in kinds:
            name = f"layer{layer}" if kind == "layer" else f"layer{layer}_{kind}"
            unit = units.get(name)
            f = unit_flops(arch, plan, kind, seq_len, 0.0 if plan.variant == "static" else 1.0 - sparsity)
            if plan.variant == "static":
                f = type(f)(f.dense, 0.0, f.router, 0.0)
            if name in folded:
                how, lff = folded[name].how, folded[name].forecaster
                lff_params = sum(p.numel() for p in lff.parameters()) if lff is not None else 0
                rows.append(UnitRow(name, layer, kind, False, 0, lff_params, f.dense,
                                    folded_unit_flops(arch, plan, kind, how, seq_len), how, evidence.get(name)))
                continue
            if unit is None:
                rows.append(UnitRow(name, layer, kind, False, 0, 0, f.dense, f.dense))
                continue
            lff = sum(p.numel() for p in unit.forecaster.parameters()) if unit.forecaster is not None else 0
            rows.append(UnitRow(name, layer, kind, True, sum(p.numel() for p in unit.router.parameters()),
                                lff, f.dense, f.routed, None, evidence.get(name),
                                ",".join(getattr(unit, "structure", ()))))
    return rows
