"""FLOPs per decoded token, dense and routed, at the execute fractions achieved while decoding.

A decode step of one token at context length C costs, per layer, the dense
``kv + query(C) + mlp`` (multiply-add = 2, as ``irc.eval.flops``); routed, every
token pays the router and the kv path, executed tokens the query path and the
MLP, approximated tokens the forecaster (``informed``). C is the mean context of
the decode steps, ``prompt + (new − 1) / 2``.
"""

from __future__ import annotations

from irc.eval.flops import forecaster_flops, router_flops


def decode_flops(arch, plan, fractions: dict[str, float | None], context: float) -> dict:
    """``{"dense", "routed", "saved", "context"}`` FLOPs per decoded token (``fractions``: per unit name)."""
    D = arch.hidden
    head = float(arch.head_flops())
    dense = routed = head
    for layer in range(arch.n_layers):
        for kind in ("attn", "mlp"):
            body_dense = (arch.attention_kv_flops() + arch.attention_query_flops(context)
                          if kind == "attn" else float(arch.mlp_flops()))
            dense += body_dense
            name = f"layer{layer}_{kind}"
            if name not in fractions:  # not routed
                routed += body_dense
                continue
            e = fractions[name] if fractions[name] is not None else 1.0
            cost = router_flops(D, plan.router_width(D))
            if plan.variant == "informed":
                cost += (1 - e) * forecaster_flops(D, plan.lff_rank)
            if kind == "attn":
                cost += arch.attention_kv_flops() + e * arch.attention_query_flops(context)
            else:
                cost += e * arch.mlp_flops()
            routed += cost
    return {"dense": dense, "routed": routed, "saved": 1 - routed / dense, "context": context}
