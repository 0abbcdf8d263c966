"""The static forecaster baseline (``--variant static-lff``): whole units replaced by their forecasters.

Per unit, a static choice between "run" and "replace by the fitted forecaster
for every token" (sinks still run: no forecaster recovers them). The choice is
greedy on held-in data: each unit alone is replaced and the increase of the
language-model loss measured; units are taken in order of loss increase per
FLOP saved until the FLOP target is met. One scoring pass per unit, not a
re-scoring after every choice: interactions between replaced units are not
seen (the price of 60 forward passes instead of ~1,800 on SmolLM2).

It is what the learned routers are measured against: if per-token routing does
not beat a static replacement at equal FLOPs, the routers learned nothing a
ranking of units could not.

The choice is expressed as thresholds (θ = +∞: always approximate, −∞: always
execute) so the model runs in ``threshold`` mode like any routed model; the
fold pass then turns every unit into a forecaster-only or a plain unit.
"""

from __future__ import annotations

import math

import torch

from irc.data.windows import batches
from irc.eval.flops import folded_unit_flops
from irc.progress import progress
from irc.train.losses import lm_loss


@torch.no_grad()
def _loss(routed, windows: torch.Tensor) -> float:
    total = 0.0
    for batch in batches(windows, 1):
        total += float(lm_loss(routed(batch), batch, torch.ones_like(batch)))
    return total / len(windows)


@torch.no_grad()
def select_static_units(routed, windows: torch.Tensor, flops_saved: float, *, seq_len: int = 1024,
                        show_progress: bool = True) -> dict:
    """Choose the units to replace by forecasters for ``flops_saved``; sets their thresholds.

    Returns the record: per unit its loss increase and FLOPs saved, and the choice.
    """
    arch, plan = routed.arch, routed.plan
    units = routed.units
    dense_total = float(arch.dense_flops_per_token(seq_len))
    saved = {name: float(arch.unit_flops(u.kind, seq_len)) - folded_unit_flops(arch, plan, u.kind, "forecast", seq_len)
             for name, u in units.items()}
    routed.set_routing("threshold", record=False)
    for u in units.values():
        u.threshold.fill_(-math.inf)
    bar = progress(total=len(units) + 1, desc="static-lff: scoring units", unit="pass", enabled=show_progress)
    try:
        base = _loss(routed, windows)
        bar.update(1)
        increase = {}
        for name, u in units.items():
            u.threshold.fill_(math.inf)
            increase[name] = _loss(routed, windows) - base
            u.threshold.fill_(-math.inf)
            bar.update(1)
    finally:
        bar.close()
    order = sorted(units, key=lambda n: increase[n] / saved[n])
    chosen, total = [], 0.0
    for name in order:
        if total >= flops_saved * dense_total:
            break
        chosen.append(name)
        total += saved[name]
    for name in chosen:
        units[name].threshold.fill_(math.inf)
    return {"base_loss": round(base, 5), "target_flops_saved": flops_saved,
            "chosen": chosen, "flops_saved_by_choice": total / dense_total,
            "units": {n: {"loss_increase": round(increase[n], 5), "flops_saved": round(saved[n] / dense_total, 5)}
                      for n in units}}
