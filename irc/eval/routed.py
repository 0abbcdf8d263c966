"""Evaluation of a routed model: perplexity, achieved sparsity, FLOPs.

The routed model is put in its inference mode (``threshold`` for informed and
skip routing, ``capacity`` for Mixture-of-Depths, the dropped layers for
static), perplexity is measured by ``evaluate_perplexity`` (the same function
as for dense models), and the units' counters give the achieved sparsity per
unit kind and per layer. FLOPs per token use each unit's *achieved* execute
fraction, router and forecaster costs included.
"""

from __future__ import annotations

import numpy as np

from irc.eval.flops import Budget, flops_budget, folded_unit_flops, sparsity_budget, unit_flops
from irc.eval.perplexity import evaluate_perplexity
from irc.eval.sparsity import achieved_sparsity


def inference_mode(routed, sparsity: float | None = None) -> None:
    if routed.plan.variant == "mod":
        training = routed.records.get("training", {})
        if sparsity is None:
            sparsity = training.get("sparsity") or training.get("nominal_sparsity") or 0.0
        capacity = 1.0 - sparsity
        routed.set_routing("capacity", capacity=capacity, record=True)
    else:
        routed.set_routing("threshold", record=True)


def routed_budget(routed, *, sparsity: float | None = None, flops_saved: float | None = None,
                  seq_len: int = 1024) -> Budget:
    """The budget over ``routed``'s dynamic units: unit sparsity or FLOPs saved (folded units fixed)."""
    if (sparsity is None) == (flops_saved is None):
        raise ValueError("give exactly one of sparsity and flops_saved")
    dynamic = {name: u.kind for name, u in routed.units.items()}
    folded = {name: (u.kind, u.how) for name, u in getattr(routed, "folded", {}).items()}
    if flops_saved is not None:
        return flops_budget(routed.arch, routed.plan, seq_len, flops_saved, dynamic, folded)
    return sparsity_budget(sparsity, dynamic, folded, n_sink=routed.plan.n_sink, seq_len=seq_len)


def routed_flops(routed, seq_len: int) -> dict:
    """FLOPs per token, dense and routed at each unit's achieved execute fraction."""
    arch, plan = routed.arch, routed.plan
    dense = routed_total = float(arch.head_flops())
    units = routed.units
    folded = getattr(routed, "folded", {})
    for layer in range(arch.n_layers):
        kinds = ("layer",) if plan.variant in ("mod", "static") else ("attn", "mlp")
        for kind in kinds:
            name = f"layer{layer}" if kind == "layer" else f"layer{layer}_{kind}"
            if name in folded:
                dense += arch.unit_flops(kind, seq_len)
                routed_total += folded_unit_flops(arch, plan, kind, folded[name].how, seq_len)
                continue
            unit = units.get(name)
            e = unit.execute_fraction if unit is not None and unit.execute_fraction is not None else 1.0
            if unit is not None and plan.variant == "static":
                f = unit_flops(arch, plan, kind, seq_len, 1.0)
                dense += f.dense
                continue
            f = unit_flops(arch, plan, kind, seq_len, e)
            dense += f.dense
            routed_total += f.routed if unit is not None else f.dense
    return {"dense": dense, "routed": routed_total, "saved": 1 - routed_total / dense}


def evaluate_routed(routed, tokens: np.ndarray, *, seq_len: int = 1024, stride: int | None = None,
                    max_tokens: int | None = None, sparsity: float | None = None,
                    show_progress: bool = True) -> dict:
    inference_mode(routed, sparsity)
    routed.reset_stats()
    result = evaluate_perplexity(routed, tokens, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                                 show_progress=show_progress)
    achieved = achieved_sparsity(routed)
    return {**result.to_dict(), "sparsity": achieved, "flops_per_token": routed_flops(routed, seq_len)}
