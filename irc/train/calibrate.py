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
"""

from __future__ import annotations

import torch

from irc.progress import progress
from irc.train.windows import batches


@torch.no_grad()
def calibrate_thresholds(routed, windows: torch.Tensor, sparsity: float, *, iterations: int = 3,
                         batch_size: int = 1, method: str = "offset", show_progress: bool = True) -> dict:
    """Set every unit's θ so the model reaches ``sparsity``; returns what it achieved.

    ``method="offset"`` (default): one common θ for all units, the margin at
    which the units together execute ``1 − sparsity`` of the tokens: units whose
    routers are confident keep their tokens, unsure ones give them up.
    ``method="allocation"``: a router trained with hard Gumbel gates executes a token with probability
    σ(margin), so its learned execute fraction is the mean of σ(margin) over
    tokens. Each unit's target fraction is that learned fraction, rescaled so
    that the units together execute ``1 − sparsity`` of the tokens; its θ is the
    margin quantile that executes exactly its target. Thresholds change the
    inputs of later units, so the solve repeats on fresh passes.
    """
    units = routed.units
    if routed.plan.variant in ("mod", "static"):
        return {"target_sparsity": sparsity, "method": "capacity" if routed.plan.variant == "mod" else "static"}
    if method not in ("offset", "allocation"):
        raise ValueError(f"method must be offset or allocation, got {method!r}")
    margins: dict[str, list[torch.Tensor]] = {name: [] for name in units}
    hooks = []
    for name, unit in units.items():
        def hook(module, args, out, name=name):
            margins[name].append((out[..., 0] - out[..., 1]).float().reshape(-1, out.shape[-2]))
        hooks.append(unit.router.register_forward_hook(hook))
    n_sink = routed.plan.n_sink
    targets: dict[str, float] = {}
    bar = progress(total=iterations, desc="calibrating thresholds", unit="pass", enabled=show_progress)
    try:
        for it in range(iterations):
            for name in units:
                margins[name] = []
            routed.set_routing("threshold", record=False)
            for batch in batches(windows, batch_size):
                routed(batch)
            free = {name: torch.cat(m)[:, n_sink:].reshape(-1) for name, m in margins.items()}
            if method == "offset":
                want = max(0.0, (1 - sparsity - n_sink / windows.shape[1]) / (1 - n_sink / windows.shape[1]))
                theta = _threshold_for(torch.cat(list(free.values())), want)
                for unit in units.values():
                    unit.threshold.fill_(theta)
            else:
                if it == 0:  # the learned allocation, from the first pass (θ as trained)
                    targets = _unit_targets(free, sparsity, n_sink, windows.shape[1])
                for name, unit in units.items():
                    unit.threshold.fill_(_threshold_for(free[name], targets[name]))
            bar.update(1)
    finally:
        bar.close()
        for h in hooks:
            h.remove()
    routed.reset_stats()
    routed.set_routing("threshold", record=True)
    for batch in batches(windows, batch_size):
        routed(batch)
    achieved = achieved_sparsity(routed)
    return {"method": method, "target_sparsity": sparsity,
            "achieved_sparsity": achieved["overall"], "by_kind": achieved["by_kind"],
            "thresholds": {n: round(float(u.threshold), 4) for n, u in units.items()}}


def _unit_targets(free: dict[str, torch.Tensor], sparsity: float, n_sink: int, seq_len: int) -> dict[str, float]:
    """Execute fractions of the non-sink tokens per unit: the learned σ(margin) means, rescaled."""
    learned = {n: float(torch.sigmoid(m).mean()) for n, m in free.items()}
    sink_share = min(n_sink, seq_len) / seq_len
    # the fraction of non-sink tokens to execute so that, sinks included, 1 − sparsity execute
    want = max(0.0, (1 - sparsity - sink_share) / (1 - sink_share))
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


def _threshold_for(margins: torch.Tensor, fraction: float) -> float:
    """θ such that ``margin ≥ θ`` holds for ``fraction`` of ``margins``."""
    k = round(fraction * margins.numel())
    ordered = torch.sort(margins, descending=True).values
    if k <= 0:
        return float(ordered[0]) + 1.0
    if k >= margins.numel():
        return float(ordered[-1]) - 1.0
    return float((ordered[k - 1] + ordered[k]) / 2)


def achieved_sparsity(routed) -> dict:
    """Sparsity (1 − execute fraction) overall, per unit kind and per layer, from the units' counters.

    Units the plan left dense count as executing every token, so that "overall"
    is over every unit of the model (for ``static``: the share of layers dropped).
    """
    plan = routed.plan
    kinds = ("layer",) if plan.variant in ("mod", "static") else ("attn", "mlp")
    units = routed.units
    tokens_seen = max((u.tokens for u in units.values()), default=0)
    by_kind: dict[str, list[int]] = {}
    by_layer: dict[int, list[int]] = {}
    executed = tokens = 0
    for layer in range(routed.arch.n_layers):
        for kind in kinds:
            name = f"layer{layer}" if kind == "layer" else f"layer{layer}_{kind}"
            unit = units.get(name)
            e, t = (unit.executed, unit.tokens) if unit is not None else (tokens_seen, tokens_seen)
            for acc in (by_kind.setdefault(kind, [0, 0]), by_layer.setdefault(layer, [0, 0])):
                acc[0] += e
                acc[1] += t
            executed += e
            tokens += t
    frac = lambda e, t: 1 - e / t if t else None  # noqa: E731
    return {
        "overall": frac(executed, tokens),
        "by_kind": {k: frac(*v) for k, v in by_kind.items()},
        "by_layer": {k: frac(*v) for k, v in sorted(by_layer.items())},
        "by_unit": {n: (1 - u.execute_fraction) if u.execute_fraction is not None else None
                    for n, u in units.items()},
    }
