"""Achieved sparsity of a routed model, from its units' counters.

Statistics, not training: calibration (``irc.eval.calibrate``) and evaluation
(``irc.eval``) both read them, so they live here, below both.
"""

from __future__ import annotations


def all_units(routed) -> dict:
    """Every routed module by name: the dynamic units (with routers) and the folded ones."""
    return {**routed.units, **getattr(routed, "folded", {})}


def achieved_sparsity(routed) -> dict:
    """Sparsity (1 − execute fraction) overall, per unit kind and per layer, from the units' counters.

    Units the plan left dense count as executing every token, so that "overall"
    is over every unit of the model (for ``static``: the share of layers dropped).
    Folded units count what they run: sinks only (forecast) or every token (plain).
    """
    plan = routed.plan
    kinds = ("layer",) if plan.variant in ("mod", "static") else ("attn", "mlp")
    units = all_units(routed)
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
