"""FLOPs per token of dense and routed models (multiply-add = 2).

Routed costs count what the implementation runs, at a nominal execute fraction
e of each routed unit:

- every token: the pre-norm (not counted, as in the dense count) and the router;
- attention: keys and values for every token, the query path (q_proj, scores
  against all keys, o_proj) for executed tokens only;
- MLP: executed tokens only;
- the forecaster: approximated tokens only (``informed``; ``skip`` has none);
- Mixture-of-Depths: executed tokens run the whole layer, attending to the
  selected tokens only (context scales by e).
"""

from __future__ import annotations

from dataclasses import dataclass

from irc.models.arch import Architecture, mean_context
from irc.plan import RoutingPlan


@dataclass(frozen=True)
class UnitFlops:
    dense: float
    routed: float
    router: float
    forecaster: float


def router_flops(hidden: int, width: int, outputs: int = 2) -> int:
    return 2 * (hidden * width + width * outputs)


def forecaster_flops(hidden: int, rank: int) -> int:
    return 2 * 2 * hidden * rank


def unit_flops(arch: Architecture, plan: RoutingPlan, kind: str, seq_len: int, execute: float) -> UnitFlops:
    """Per-token FLOPs of one unit (``attn``, ``mlp``, or ``layer`` for ``mod``), dense and routed."""
    D = arch.hidden
    width = plan.router_width(D)
    if kind == "layer":
        dense = arch.attention_flops(seq_len) + arch.mlp_flops()
        router = router_flops(D, width, 1)
        context = mean_context(seq_len) * execute
        routed = execute * (arch.attention_kv_flops() + arch.attention_query_flops(context)
                            + arch.mlp_flops()) + router
        return UnitFlops(dense, routed, router, 0.0)
    dense = arch.unit_flops(kind, seq_len)
    router = router_flops(D, width)
    lff = forecaster_flops(D, plan.lff_rank) * (1 - execute) if plan.variant == "informed" else 0.0
    if kind == "attn":
        body = arch.attention_kv_flops() + execute * arch.attention_query_flops(mean_context(seq_len))
    else:
        body = execute * arch.mlp_flops()
    return UnitFlops(dense, body + router + lff, router, lff)


def model_flops(arch: Architecture, plan: RoutingPlan, seq_len: int, execute: float) -> tuple[float, float]:
    """(dense, routed) FLOPs per token of the whole model, LM head included."""
    dense = routed = float(arch.head_flops())
    for layer in range(arch.n_layers):
        if plan.variant == "static":
            u = unit_flops(arch, plan, "layer", seq_len, 1.0)
            dense += u.dense
            routed += 0.0 if plan.selects(layer, "layer") else u.dense
            continue
        if plan.variant == "mod":
            u = unit_flops(arch, plan, "layer", seq_len, execute if plan.selects(layer, "layer") else 1.0)
            dense += u.dense
            routed += u.routed if plan.selects(layer, "layer") else u.dense
            continue
        for kind in ("attn", "mlp"):
            u = unit_flops(arch, plan, kind, seq_len, execute)
            dense += u.dense
            routed += u.routed if plan.selects(layer, kind) else u.dense
    return dense, routed


# --- compute budgets --------------------------------------------------------
#
# A routed unit's FLOPs per token are affine in its execute fraction e:
# ``fixed + e·swing`` (fixed: router, and for attention the key/value path; the
# forecaster runs for approximated tokens, so it lowers the swing). A target in
# FLOPs saved is therefore one linear constraint on the execute fractions,
# ``Σ w_u·e_u = target`` with ``w_u ∝ swing_u``; a target in unit sparsity is the
# same constraint with equal weights. Training, calibration and reports share it.


@dataclass(frozen=True)
class Budget:
    """A compute target as ``Σ_u weights[u]·e_u = target`` over the dynamic units (Σ weights = 1)."""

    kind: str  # "flops" or "sparsity"
    value: float  # the FLOP fraction saved, or the unit sparsity, asked for
    weights: dict[str, float]
    target: float

    def describe(self) -> str:
        return (f"{100 * self.value:.1f}% of FLOPs saved" if self.kind == "flops"
                else f"unit sparsity {self.value:.2f}")


def affine_cost(arch: Architecture, plan: RoutingPlan, kind: str, seq_len: int) -> tuple[float, float]:
    """(fixed, swing): a routed unit costs ``fixed + e·swing`` FLOPs per token at execute fraction e."""
    zero = unit_flops(arch, plan, kind, seq_len, 0.0).routed
    return zero, unit_flops(arch, plan, kind, seq_len, 1.0).routed - zero


def route_saving(arch: Architecture, plan: RoutingPlan, kind: str, seq_len: int, execute: float) -> float:
    """The share of the dense model's FLOPs per token that one routed unit's route saves at
    execute fraction ``execute``, against running the unit on every token (no router, no
    forecaster): what folding it ``plain`` gives up. Negative when the router costs more than
    the skipped tokens save."""
    fixed, swing = affine_cost(arch, plan, kind, seq_len)
    return (arch.unit_flops(kind, seq_len) - fixed - execute * swing) / arch.dense_flops_per_token(seq_len)


def folded_execute(how: str, n_sink: int, seq_len: int) -> float:
    """Execute fraction of a folded unit: every token (plain) or the sinks only (forecast)."""
    return 1.0 if how == "plain" else min(n_sink, seq_len) / seq_len


def folded_unit_flops(arch: Architecture, plan: RoutingPlan, kind: str, how: str, seq_len: int) -> float:
    """Per-token FLOPs of a folded unit: no router; a forecast-folded attention unit computes
    keys, values and queries for the sink tokens only (which attend to sinks only)."""
    if how == "plain":
        return float(arch.unit_flops(kind, seq_len))
    e = folded_execute(how, plan.n_sink, seq_len)
    lff = forecaster_flops(arch.hidden, plan.lff_rank) * (1 - e)
    if kind == "attn":
        sinks = arch.attention_kv_flops() + arch.attention_query_flops(mean_context(plan.n_sink))
        return e * sinks + lff
    return e * arch.mlp_flops() + lff


def flops_budget(arch: Architecture, plan: RoutingPlan, seq_len: int, flops_saved: float,
                 dynamic: dict[str, str], folded: dict[str, tuple[str, str]] | None = None) -> Budget:
    """The execute-fraction constraint that saves ``flops_saved`` of the dense FLOPs per token.

    ``dynamic``: unit name → kind of the units whose fractions are free;
    ``folded``: unit name → (kind, how) of folded units (their cost is fixed).
    Units in neither are dense. Raises ``UserError`` when the target is out of reach.
    """
    from irc.errors import UserError

    folded = folded or {}
    dense = float(arch.dense_flops_per_token(seq_len))
    fixed_total = float(arch.head_flops())
    routed_kinds = [*dynamic.values(), *(k for k, _ in folded.values())]
    # units the plan leaves dense
    per_kind = {k: arch.unit_flops(k, seq_len) for k in ("attn", "mlp")}
    n_dense = {k: arch.n_layers - routed_kinds.count(k) for k in per_kind}
    fixed_total += sum(per_kind[k] * n for k, n in n_dense.items())
    swings = {}
    for name, kind in dynamic.items():
        fixed, swing = affine_cost(arch, plan, kind, seq_len)
        fixed_total += fixed
        swings[name] = swing
    for kind, how in folded.values():
        fixed_total += folded_unit_flops(arch, plan, kind, how, seq_len)
    total_swing = sum(swings.values())
    lowest = 1 - (fixed_total) / dense
    highest = 1 - (fixed_total + total_swing) / dense
    if total_swing <= 0 or not highest - 1e-9 <= flops_saved <= lowest + 1e-9:
        raise UserError(f"--flops-saved {flops_saved:.3f} is out of reach for this model and plan: routing saves "
                        f"between {max(highest, 0):.3f} (every token executes; routers cost FLOPs) and "
                        f"{lowest:.3f} (every token approximated)")
    target = ((1 - flops_saved) * dense - fixed_total) / total_swing
    return Budget("flops", flops_saved, {n: s / total_swing for n, s in swings.items()},
                  min(max(target, 0.0), 1.0))


def sparsity_budget(sparsity: float, dynamic: dict[str, str], folded: dict[str, tuple[str, str]] | None = None,
                    *, n_sink: int = 0, seq_len: int = 1) -> Budget:
    """Unit sparsity ``sparsity`` (the paper's objective) as a budget: equal weights."""
    folded = folded or {}
    n_all = len(dynamic) + len(folded)
    want = (1 - sparsity) * n_all - sum(folded_execute(how, n_sink, seq_len) for _, how in folded.values())
    target = want / len(dynamic) if dynamic else 0.0
    return Budget("sparsity", sparsity, {n: 1 / len(dynamic) for n in dynamic}, min(max(target, 0.0), 1.0))


def sparsity_for_flops(arch: Architecture, plan: RoutingPlan, seq_len: int, flops_saved: float) -> float:
    """The uniform sparsity (every routed unit at one execute fraction) that saves ``flops_saved``.

    For variants without per-unit budgets (``mod``, ``static``): a bisection on ``model_flops``.
    """
    lo, hi = 0.0, 0.999  # sparsity
    for _ in range(60):
        mid = (lo + hi) / 2
        dense, routed = model_flops(arch, plan, seq_len, 1 - mid)
        if 1 - routed / dense < flops_saved:
            lo = mid
        else:
            hi = mid
    return hi
