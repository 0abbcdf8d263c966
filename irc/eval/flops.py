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
