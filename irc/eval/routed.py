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


def recalibrate(routed, *, sparsity: float | None = None, flops_saved: float | None = None,
                calib_data: str = "wiki:train", seq_len: int = 1024, name: str = "this routed model",
                show_progress: bool = True) -> dict | None:
    """Move a routed model's dial (``irc eval --sparsity`` / ``--flops-saved``): recalibrate the
    thresholds on the last 4 windows of ``calib_data`` (held-in). Returns the calibration record,
    or None where there is nothing to calibrate (no dial, or a ``mod`` / ``static`` model, whose
    dial is the capacity that ``inference_mode`` sets from ``sparsity``)."""
    from irc.data import load_corpus, token_stream
    from irc.data.windows import make_windows
    from irc.errors import UserError
    from irc.eval.calibrate import calibrate_thresholds

    if sparsity is not None and flops_saved is not None:
        raise UserError("give one dial: --sparsity S or --flops-saved F, not both")
    for flag, value in (("--sparsity", sparsity), ("--flops-saved", flops_saved)):
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    if sparsity is None and flops_saved is None:
        return None
    held_in = token_stream(load_corpus(calib_data, default_split="train"), routed.tokenizer)
    n = 4 * seq_len
    if len(held_in) < n:
        raise UserError(f"{calib_data} has too few tokens to calibrate ({len(held_in)} < {n})")
    calib = make_windows(held_in[len(held_in) - n :], seq_len, 4)
    if routed.plan.variant in ("mod", "static"):
        if flops_saved is not None:
            raise UserError(f"--flops-saved moves thresholds; a {routed.plan.variant} model's dial is --sparsity")
        return None
    budget = routed_budget(routed, sparsity=sparsity, flops_saved=flops_saved, seq_len=seq_len)
    if not routed.units:
        raise UserError(f"{name} has no dynamic units left (all folded): its compute is fixed")
    return calibrate_thresholds(routed, calib, budget=budget, show_progress=show_progress)
