"""The sparsity dial: thresholds that make the achieved sparsity match a target.

After training, the routers' margins (``logit_exec − logit_approx``) rank tokens
by how much they need their unit. Calibration sets the thresholds θ on held-in
data so that the units together execute ``1 − s`` of the real tokens (sinks
included), either with one common θ (``offset``, the default) or with per-unit
θs that keep each unit's learned execute fraction (``allocation``). On SmolLM2
at 0.25 (quick preset) the common θ gave perplexity 35.4 and the per-unit
allocation 41.7 (see the notes of issue #4). ``irc eval OUT --sparsity S2`` runs
the same calibration at deploy time.

Mixture-of-Depths (``mod``) needs no calibration: its capacity is the dial.

Calibration is measurement, so it lives in ``irc.eval`` and imports nothing from
``irc.train``; a convert running on several processes hands it the process
group's collectives (``ranks=irc.train.distributed.RANKS``): each process then
runs its shard of the windows and the margins and counters are gathered.
"""

from __future__ import annotations

from typing import Protocol

import torch

from irc.data.windows import batches
from irc.eval.sparsity import achieved_sparsity
from irc.progress import progress


class Ranks(Protocol):
    """The collectives calibration needs (``irc.train.distributed.RANKS`` on a process group)."""

    @property
    def distributed(self) -> bool: ...

    def shard(self, batch: torch.Tensor) -> torch.Tensor: ...  # this process's rows of the batch

    def all_gather_cat(self, parts: list[torch.Tensor]) -> list[torch.Tensor]: ...  # every rank's, in rank order

    def sum_unit_counters(self, routed) -> None: ...  # executed/token counters summed over ranks


class OneProcess:
    """``Ranks`` of a single process: its shard is everything, nothing to gather."""

    distributed = False

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def all_gather_cat(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(parts)

    def sum_unit_counters(self, routed) -> None:
        return None


@torch.no_grad()
def calibrate_thresholds(routed, windows: torch.Tensor, sparsity: float | None = None, *, budget=None,
                         iterations: int = 3, batch_size: int = 1, method: str = "offset",
                         show_progress: bool = True, ranks: Ranks | None = None) -> dict:
    """Set every unit's θ so the model meets a budget; returns what it achieved.

    The budget is ``sparsity`` (the paper's unit sparsity) or ``budget``, an
    ``irc.eval.flops.Budget`` (``routed_budget(routed, flops_saved=F)``): a target
    for the units' execute fractions weighted by what each unit's execution costs.

    ``method="offset"`` (default): one common θ for all units, the margin at
    which the units together (weighted by the budget) execute its target: units
    whose routers are confident keep their tokens, unsure ones give them up.
    ``method="allocation"`` (unit sparsity only): a router trained with hard Gumbel gates executes a token with probability
    σ(margin), so its learned execute fraction is the mean of σ(margin) over
    tokens. Each unit's target fraction is that learned fraction, rescaled so
    that the units together execute ``1 − sparsity`` of the tokens; its θ is the
    margin quantile that executes exactly its target. Thresholds change the
    inputs of later units, so the solve repeats on fresh passes.

    ``ranks``: the process group's collectives where several processes calibrate together
    (each passes the same ``windows``); None: this process alone.
    """
    from irc.eval.routed import routed_budget

    units = routed.units
    if routed.plan.variant in ("mod", "static"):
        return {"target_sparsity": sparsity, "method": "capacity" if routed.plan.variant == "mod" else "static"}
    if method not in ("offset", "allocation"):
        raise ValueError(f"method must be offset or allocation, got {method!r}")
    if budget is None:
        if sparsity is None:
            raise ValueError("calibrate_thresholds needs a sparsity or a budget")
        budget = routed_budget(routed, sparsity=sparsity, seq_len=windows.shape[1])
    if method == "allocation" and budget.kind != "sparsity":
        raise ValueError("the allocation method calibrates unit sparsity only")
    margins: dict[str, list[torch.Tensor]] = {name: [] for name in units}
    hooks = []
    for name, unit in units.items():
        def hook(module, args, out, name=name):
            margins[name].append((out[..., 0] - out[..., 1]).float().reshape(-1, out.shape[-2]))
        hooks.append(unit.router.register_forward_hook(hook))
    n_sink = routed.plan.n_sink
    T = windows.shape[1]
    sink_share = min(n_sink, T) / T
    targets: dict[str, float] = {}
    ranks = ranks or OneProcess()
    mine = ranks.shard(windows)  # many processes: each runs its windows, the margins are gathered
    bar = progress(total=iterations, desc="calibrating thresholds", unit="pass", enabled=show_progress)
    try:
        for it in range(iterations):
            for name in units:
                margins[name] = []
            routed.set_routing("threshold", record=False)
            for batch in batches(mine, batch_size):
                routed(batch)
            free = {name: m[:, n_sink:].reshape(-1) for name, m in _all_margins(margins, T, ranks).items()}
            if method == "offset":
                theta = _common_threshold(free, budget, sink_share)
                for unit in units.values():
                    unit.threshold.fill_(theta)
            else:
                if it == 0:  # the learned allocation, from the first pass (θ as trained)
                    targets = _unit_targets(free, budget.target, sink_share)
                for name, unit in units.items():
                    unit.threshold.fill_(_threshold_for(free[name], targets[name]))
            bar.update(1)
    finally:
        bar.close()
        for h in hooks:
            h.remove()
    routed.reset_stats()
    routed.set_routing("threshold", record=True)
    for batch in batches(mine, batch_size):
        routed(batch)
    ranks.sum_unit_counters(routed)
    achieved = achieved_sparsity(routed)
    from irc.eval.routed import routed_flops

    flops = routed_flops(routed, T)
    return {"method": method, "budget": budget.kind, "target_sparsity": sparsity if budget.kind == "sparsity" else None,
            "target_flops_saved": budget.value if budget.kind == "flops" else None,
            "achieved_flops_saved": flops["saved"],
            "achieved_sparsity": achieved["overall"], "by_kind": achieved["by_kind"],
            "by_unit": {n: round(v, 5) for n, v in achieved["by_unit"].items() if v is not None},
            "thresholds": {n: round(float(u.threshold), 4) for n, u in units.items()}}


def _all_margins(margins: dict[str, list[torch.Tensor]], T: int, ranks: Ranks) -> dict[str, torch.Tensor]:
    """Each unit's margins ``[windows, T]`` over all windows: this process's, or with many
    processes every rank's in rank order (the windows' order)."""
    if not ranks.distributed:
        return {name: torch.cat(m) for name, m in margins.items()}
    local = [torch.cat(m).reshape(-1) if m else torch.zeros(0) for m in margins.values()]
    return {name: g.reshape(-1, T) for name, g in zip(margins, ranks.all_gather_cat(local), strict=True)}


def _unit_targets(free: dict[str, torch.Tensor], target: float, sink_share: float) -> dict[str, float]:
    """Execute fractions of the non-sink tokens per unit: the learned σ(margin) means, rescaled."""
    learned = {n: float(torch.sigmoid(m).mean()) for n, m in free.items()}
    # the fraction of non-sink tokens to execute so that, sinks included, ``target`` execute
    want = max(0.0, (target - sink_share) / (1 - sink_share))
    mean = sum(learned.values()) / len(learned)
    scale = want / mean if mean > 0 else 1.0
    targets = {n: min(1.0, f * scale) for n, f in learned.items()}
    # units capped at 1 leave a shortfall; spread it over the others
    for _ in range(10):
        short = want * len(targets) - sum(targets.values())
        room = [n for n, t in targets.items() if t < 1.0]
        if short <= 1e-9 or not room:
            break
        for n in room:
            targets[n] = min(1.0, targets[n] + short / len(room))
    return targets


def _common_threshold(free: dict[str, torch.Tensor], budget, sink_share: float) -> float:
    """One θ for all units such that ``Σ_u w_u·e_u(θ) = target`` (sinks always execute).

    Each non-sink margin of unit u adds ``w_u·(1 − sink_share)/N_u`` to the weighted
    execute fraction when it clears θ: sort the pooled margins, accumulate, and
    put θ between the last margin needed and the next.
    """
    names = list(free)
    want = budget.target - sink_share * sum(budget.weights[n] for n in names)
    values = torch.cat([free[n] for n in names])
    share = torch.cat([torch.full_like(free[n], budget.weights[n] * (1 - sink_share) / max(free[n].numel(), 1))
                       for n in names]).double()
    order = torch.sort(values, descending=True, stable=True).indices
    ordered, gained = values[order], torch.cumsum(share[order], 0)
    k = int(torch.searchsorted(gained, torch.tensor(want, dtype=gained.dtype) - 1e-12)) + 1  # margins to execute
    if want <= 1e-12 or k <= 0:
        return float(ordered[0]) + 1.0
    if k >= ordered.numel():
        return float(ordered[-1]) - 1.0
    return float((ordered[k - 1] + ordered[k]) / 2)


def _threshold_for(margins: torch.Tensor, fraction: float) -> float:
    """θ such that ``margin ≥ θ`` holds for ``fraction`` of ``margins``."""
    k = round(fraction * margins.numel())
    ordered = torch.sort(margins, descending=True).values
    if k <= 0:
        return float(ordered[0]) + 1.0
    if k >= margins.numel():
        return float(ordered[-1]) - 1.0
    return float((ordered[k - 1] + ordered[k]) / 2)
