"""Capture the decode step of a decoder LM: past keys and values in, present ones out.

The captured program is a functional KV cache::

    (input_ids [B, T], attention_mask [B, P+T], past_0 .. past_2L-1 [B, Hkv, P, hd])
        -> (logits [B, T, V], present_0 .. present_2L-1 [B, Hkv, P+T, hd])

with ``past_2l`` / ``past_2l+1`` the keys / values of layer ``l``. The wrapper
builds a transformers ``DynamicCache`` holding the past tensors, so each
attention module concatenates its new keys and values to them
(``torch.cat``, inside the attention module) and the graph returns the
concatenations. Batch, new tokens T (≥ 1) and past length P (≥ 0) are dynamic:
the same graph runs the prompt (P = 0) and every decode step (T = 1), as long as
P + T ≥ ``MIN_CONTEXT`` (4; ``generate`` left-pads shorter prompts). Positions
are ``P + arange(T)``, as in the prefill capture (``irc.capture``), so a decode
step sees exactly the positions, masks and keys that prefill of the whole
sequence does.

This is the graph ``route_decoder_blocks`` rewrites for generation; the cache
outputs leave the attention units as extra outputs (``Unit.cache_outputs``).
"""

from __future__ import annotations

import time

import torch
from torch.export import Dim, export

from irc.capture import MAX_BATCH, Capture

# export traces P and T as sizes >= 2, and transformers' mask code ties the mask length to
# P + T, so the graph guards P + T >= 4; shorter prompts are left-padded to it (mask 0):
# padding is never attended nor executed, and rotary attention depends on relative positions.
MIN_CONTEXT = 4


class DecodeStep(torch.nn.Module):
    """``model(input_ids, attention_mask, past_key_values=past)`` with the cache as plain tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=self.m.config)
        # a sliding-window layer (Gemma 2/3) would keep only its last window of keys; the graph
        # keeps all P + T and lets the model's sliding mask hide the rest, as prefill does
        cache.layers = [layer if type(layer) is DynamicLayer else DynamicLayer() for layer in cache.layers]
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
            layer.is_initialized = True
            layer.dtype, layer.device = past[0].dtype, past[0].device
        logits = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                        use_cache=True).logits
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


def cache_shape(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a model's KV cache."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


def empty_cache(config, batch: int, dtype: torch.dtype, device="cpu") -> list[torch.Tensor]:
    """Past keys and values of length 0: the decode graph then runs a prompt."""
    layers, kv_heads, head_dim = cache_shape(config)
    return [torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device) for _ in range(2 * layers)]


def capture_decode(model: torch.nn.Module, *, max_seq: int | None = None) -> Capture:
    """Export the decode step of ``model`` to a ``GraphModule`` (see the module docstring)."""
    config = model.config
    max_seq = max_seq or int(getattr(config, "max_position_embeddings", 0) or 8192)
    dtype = next(model.parameters()).dtype
    # batch 2, 3 new tokens after 5 past ones, row 1 left-padded: no size is 0 or 1, so
    # nothing specialises; P = 0 and T = 1 still run (checked in the tests).
    B, P, T = 2, 5, 3
    ids = torch.randint(0, min(int(config.vocab_size), 1000), (B, T))
    mask = torch.ones(B, P + T, dtype=torch.long)
    mask[1, :2] = 0
    layers, kv_heads, head_dim = cache_shape(config)
    past = tuple(torch.randn(B, kv_heads, P, head_dim).to(dtype) for _ in range(2 * layers))
    batch = Dim("batch", min=1, max=MAX_BATCH)
    seq = Dim("seq", min=1, max=max_seq)
    past_len = Dim("past", min=0, max=max_seq)
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},  # P + T: derived by export
        "past": tuple({0: batch, 2: past_len} for _ in past),
    }
    start = time.perf_counter()
    with torch.no_grad():
        ep = export(DecodeStep(model).eval(), (ids, mask, *past), dynamic_shapes=dynamic, strict=False)
    gm = ep.module()
    seconds = time.perf_counter() - start
    gm.meta["irc_capture"] = {"max_seq": max_seq, "max_batch": MAX_BATCH, "decode": True,
                              "cache_tensors": len(past)}
    return Capture(gm=gm, seconds=seconds, nodes=len(gm.graph.nodes))
