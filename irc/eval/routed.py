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

from irc.eval.flops import unit_flops
from irc.eval.perplexity import evaluate_perplexity
from irc.train.calibrate import achieved_sparsity


def inference_mode(routed, sparsity: float | None = None) -> None:
    if routed.plan.variant == "mod":
        capacity = 1.0 - (sparsity if sparsity is not None else routed.records.get("training", {}).get("sparsity", 0.0))
        routed.set_routing("capacity", capacity=capacity, record=True)
    else:
        routed.set_routing("threshold", record=True)


def routed_flops(routed, seq_len: int) -> dict:
    """FLOPs per token, dense and routed at each unit's achieved execute fraction."""
    arch, plan = routed.arch, routed.plan
    dense = routed_total = float(arch.head_flops())
    units = routed.units
    for layer in range(arch.n_layers):
        kinds = ("layer",) if plan.variant in ("mod", "static") else ("attn", "mlp")
        for kind in kinds:
            name = f"layer{layer}" if kind == "layer" else f"layer{layer}_{kind}"
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
