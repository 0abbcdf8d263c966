"""The sparsity dial: thresholds that make the achieved sparsity match a target.

After training, the routers' margins (``logit_exec − logit_approx``) rank tokens
by how much they need their unit. Calibration shifts every unit's threshold θ
by one common offset δ, chosen on held-in data so that the mean execute
fraction over units and real tokens is ``1 − s``; the allocation across units
the routers learned (more sparsity where it is cheap) is kept. Moving θ changes
the inputs of later units, so the offset is re-solved on a fresh pass a few
times. ``irc eval OUT --sparsity S2`` runs the same calibration at deploy time.

Mixture-of-Depths (``mod``) needs no calibration: its capacity is the dial.
"""

from __future__ import annotations

import torch

from irc.progress import progress
from irc.train.windows import batches


@torch.no_grad()
def calibrate_thresholds(routed, windows: torch.Tensor, sparsity: float, *, iterations: int = 3,
                         batch_size: int = 1, show_progress: bool = True) -> dict:
    """Set every unit's θ to the common offset δ that reaches ``sparsity``; returns what it achieved."""
    units = routed.units
    if routed.plan.variant in ("mod", "static"):
        return {"offset": None, "target_sparsity": sparsity}
    margins: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, unit in units.items():
        def hook(module, args, out, name=name):
            margins[name].append((out[..., 0] - out[..., 1]).float())
        hooks.append(unit.router.register_forward_hook(hook))
    offset = 0.0
    bar = progress(total=iterations, desc="calibrating thresholds", unit="pass", enabled=show_progress)
    try:
        for _ in range(iterations):
            for name in units:
                margins[name] = []
            routed.set_routing("threshold", record=True)
            routed.reset_stats()
            for batch in batches(windows, batch_size):
                routed(batch)
            n_sink = routed.plan.n_sink
            # sinks always execute; the offset ranks the remaining tokens of every unit together
            free = torch.cat([torch.cat(m)[:, n_sink:].reshape(-1) for m in margins.values()])
            total = sum(torch.cat(m).numel() for m in margins.values())
            sinks = total - free.numel()
            want = round((1 - sparsity) * total) - sinks
            want = min(max(want, 0), free.numel())
            ordered = torch.sort(free, descending=True).values
            if want == 0:
                offset = float(ordered[0]) + 1.0
            elif want == free.numel():
                offset = float(ordered[-1]) - 1.0
            else:  # between the want-th and the next margin
                offset = float((ordered[want - 1] + ordered[want]) / 2)
            for unit in units.values():
                unit.threshold.fill_(offset)
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
    return {"offset": offset, "target_sparsity": sparsity, "achieved_sparsity": achieved["overall"],
            "by_kind": achieved["by_kind"]}


def achieved_sparsity(routed) -> dict:
    """Sparsity (1 − execute fraction) overall, per unit kind and per layer, from the units' counters."""
    by_kind: dict[str, list[int]] = {}
    by_layer: dict[int, list[int]] = {}
    executed = tokens = 0
    for unit in routed.units.values():
        for acc in (by_kind.setdefault(unit.kind, [0, 0]), by_layer.setdefault(unit.layer, [0, 0])):
            acc[0] += unit.executed
            acc[1] += unit.tokens
        executed += unit.executed
        tokens += unit.tokens
    frac = lambda e, t: 1 - e / t if t else None  # noqa: E731
    return {
        "overall": frac(executed, tokens),
        "by_kind": {k: frac(*v) for k, v in by_kind.items()},
        "by_layer": {k: frac(*v) for k, v in sorted(by_layer.items())},
        "by_unit": {n: (1 - u.execute_fraction) if u.execute_fraction is not None else None
                    for n, u in routed.units.items()},
    }
