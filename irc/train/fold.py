"""Folding a trained routed model: measure held-in execute fractions, fold, recalibrate.

The compiler side of what the routers learned: a unit whose route is (almost)
constant on held-in data loses its router (``irc.passes.fold_static_routes``);
the units that keep routers are recalibrated so the model's budget still holds
(folding moves a unit at 3% to 0% of non-sink tokens, or at 97% to 100%).
Used by ``irc convert --fold-epsilon``, ``irc fold`` and the frontier benchmark.

``refine_folded`` then trains the LoRA deltas of the folded model (the folded units'
too) under its calibrated decisions and recalibrates: folding at a high
``min_saving`` gives up quality the routes had (their units now always run or
never do), which LoRA trained on the folded model wins part of back
(``irc fold --refine-steps``, ``irc convert --refine-steps``).
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def held_in_fractions(routed, windows: torch.Tensor) -> dict[str, float]:
    """Each dynamic unit's execute fraction over the non-sink tokens of ``windows`` (threshold mode)."""
    from irc.eval.routed import inference_mode
    from irc.train.distributed import shard, sum_unit_counters

    inference_mode(routed)
    routed.reset_stats()
    for batch in shard(windows).split(1):  # many processes: each its windows, counters summed
        routed(batch)
    sum_unit_counters(routed)
    sinks = min(routed.plan.n_sink, windows.shape[1]) * windows.shape[0]
    return {n: (u.executed - sinks) / max(u.tokens - sinks, 1) for n, u in routed.units.items()}


def route_savings(routed, fractions: dict[str, float], seq_len: int) -> dict[str, float]:
    """Per dynamic unit, the share of the dense FLOPs per token its route saves at its fraction."""
    from irc.eval.flops import route_saving

    return {n: route_saving(routed.arch, routed.plan, u.kind, seq_len, fractions[n]) for n, u in routed.units.items()}


def near_static(fractions: dict[str, float], epsilon: float = 0.05) -> int:
    """How many units execute ≤ ε or ≥ 1 − ε of the (non-sink) tokens."""
    return sum(1 for f in fractions.values() if f <= epsilon or f >= 1 - epsilon)


def fold_routed(routed, windows: torch.Tensor, epsilon: float, *, min_saving: float = 0.0, budget=None,
                show_progress: bool = True) -> dict:
    """Fold ``routed`` in place at ``epsilon`` (and, with ``min_saving`` > 0, every route saving less
    than that share of the dense FLOPs per token: ``choose_folds``); with ``budget`` (a callable of
    the model giving an ``irc.eval.flops.Budget``), recalibrate the remaining routers to it.
    Returns the record."""
    from irc.eval.calibrate import calibrate_thresholds
    from irc.eval.sparsity import achieved_sparsity
    from irc.passes.fold_static_routes import choose_folds
    from irc.train.distributed import RANKS

    fractions = held_in_fractions(routed, windows)
    savings = route_savings(routed, fractions, windows.shape[1]) if min_saving > 0 else None
    folds = choose_folds(fractions, epsilon, savings=savings, min_saving=min_saving)
    record = {"epsilon": epsilon, "held_in_execute": {n: round(f, 5) for n, f in fractions.items()},
              "near_static": near_static(fractions), "folded": folds, "routers_before": len(routed.units)}
    if min_saving > 0:
        record["min_saving"] = min_saving
        record["folded_for_saving"] = sorted(n for n in folds if epsilon < fractions[n] < 1 - epsilon)
        record["saving_given_up"] = round(sum(savings[n] for n in record["folded_for_saving"]), 6)
    if folds:
        routed.fold(folds)
    record["routers_after"] = len(routed.units)
    if folds and routed.units and budget is not None:
        record["recalibration"] = calibrate_thresholds(routed, windows, budget=budget(routed),
                                                       show_progress=show_progress, ranks=RANKS)
    else:
        held_in_fractions(routed, windows)  # the counters now hold the folded model's fractions
        record["achieved_sparsity"] = achieved_sparsity(routed)["overall"]
    return record


def refine_folded(routed, windows: torch.Tensor, config, *, calib: torch.Tensor, budget=None, teacher=None,
                  show_progress: bool = True) -> dict:
    """Train the LoRA deltas of a folded ``routed`` on ``windows`` (``config``: an
    ``irc.train.lora_train.LoRATrainConfig``; its routing should be ``threshold``: the folded
    model's own decisions), then recalibrate its routers on ``calib`` to ``budget`` (a callable
    of the model giving a ``Budget``; None: keep the thresholds). Returns the record."""
    from irc.errors import UserError
    from irc.eval.calibrate import calibrate_thresholds
    from irc.train.distributed import RANKS
    from irc.train.lora_train import train_lora

    if routed.plan.lora_rank <= 0:
        raise UserError("refining trains the model's LoRA deltas, and this model has none (it was converted "
                        "without LoRA: --lora-steps 0, or the quick preset); convert with --lora-steps N first")
    record = {"lora": train_lora(routed, windows, config, teacher=teacher, show_progress=show_progress)}
    if routed.units and budget is not None:
        record["recalibration"] = calibrate_thresholds(routed, calib, budget=budget(routed),
                                                       show_progress=show_progress, ranks=RANKS)
    return record


def refine_windows(stream: np.ndarray, held_in_tokens: int, steps: int, batch: int, seq_len: int,
                   name: str = "the corpus") -> torch.Tensor:
    """``steps × batch`` windows of ``seq_len`` tokens for ``refine_folded``, from the start of
    ``stream``, before its last ``held_in_tokens`` (the held-in windows folding and calibration read)."""
    from irc.data.windows import make_windows
    from irc.errors import UserError

    need = steps * batch
    if (len(stream) - held_in_tokens) // seq_len < need:
        raise UserError(f"{name} has {len(stream) - held_in_tokens} tokens before its held-in windows, fewer "
                        f"than {steps} refining steps × {batch} windows of {seq_len} ({need} windows)")
    return make_windows(stream[:need * seq_len], seq_len, need)
