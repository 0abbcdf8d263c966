"""What a decoded token costs, dense and routed: FLOPs, and KV-cache bytes.

FLOPs per decoded token, at the execute fractions achieved while decoding:

A decode step of one token at context length C costs, per layer, the dense
``kv + query(C) + mlp`` (multiply-add = 2, as ``irc.eval.flops``); routed, every
token pays the router and the kv path, executed tokens the query path and the
MLP, approximated tokens the forecaster (``informed``). Folded units have no router:
a plain one costs what the dense unit does, a forecast-folded one the forecaster (a
decoded token is past the sinks). C is the mean context of the decode steps,
``prompt + (new − 1) / 2``.

KV-cache bytes per token of context (``kv_cache_bytes``): a layer whose cache grows
with the context costs keys and values, ``2 · Hkv · hd · bytes`` per token; a
forecast-folded attention layer keeps its n_sink sink slots only
(``irc.passes.compact_sink_caches``), a constant that does not grow.
"""

from __future__ import annotations

from irc.eval.flops import forecaster_flops, router_flops


def decode_flops(arch, plan, fractions: dict[str, float | None], context: float) -> dict:
    """``{"dense", "routed", "saved", "context"}`` FLOPs per decoded token (``fractions``: per unit name)."""
    D = arch.hidden
    head = float(arch.head_flops())
    dense = routed = head
    folded = dict(plan.folded or ())
    for layer in range(arch.n_layers):
        for kind in ("attn", "mlp"):
            body_dense = (arch.attention_kv_flops() + arch.attention_query_flops(context)
                          if kind == "attn" else float(arch.mlp_flops()))
            dense += body_dense
            name = f"layer{layer}_{kind}"
            how = folded.get(name)
            if how is not None:  # no router; a decoded token is past the sinks: the forecaster only
                routed += body_dense if how == "plain" else (
                    forecaster_flops(D, plan.lff_rank) if plan.variant == "informed" else 0.0)
                continue
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


def kv_cache_bytes(slots: list[int | None], kv_heads: int, head_dim: int, itemsize: int) -> dict:
    """KV-cache bytes per token of context, dense and routed, from a decoder's ``cache_slots()``.

    ``slots``: per cache tensor (keys and values of each layer), its sink slots if it keeps
    only those, else None. ``sink_bytes`` is what the sink-slot layers hold at most, per row,
    whatever the context.
    """
    per_tensor = kv_heads * head_dim * itemsize  # one token's keys (or values) in one layer
    sink = [n for n in slots if n is not None]
    return {"per_token": (len(slots) - len(sink)) * per_tensor, "dense_per_token": len(slots) * per_tensor,
            "attention_layers": len(slots) // 2, "sink_layers": len(sink) // 2,
            "sink_slots": max(sink, default=0), "sink_bytes": sum(sink) * per_tensor}


def decode_kv_bytes(routed, model, itemsize: int | None = None) -> dict:
    """``kv_cache_bytes`` of the decode graph ``generate(model, ...)`` steps: a ``RoutedModel``'s
    (in its dtype) or an ``OrtDecoder``'s (pass ``itemsize=4``: the ONNX decode file is fp32)."""
    from irc.generation.capture import cache_shape
    from irc.generation.generate import stepper_for

    _, kv_heads, head_dim = cache_shape(routed.base.model.config)
    itemsize = itemsize or routed.base.dtype.itemsize
    return kv_cache_bytes(stepper_for(model).cache_slots(), kv_heads, head_dim, itemsize)


def kv_cache_line(kv: dict) -> str:
    """``23,040 B/token (dense 46,080 B/token; 15 of 30 attention layers keep 4 sink slots)``."""
    line = f"{kv['per_token']:,} B/token (dense {kv['dense_per_token']:,} B/token"
    if kv["sink_layers"]:
        line += f"; {kv['sink_layers']} of {kv['attention_layers']} attention layers keep {kv['sink_slots']} sink slots"
    return line + ")"
