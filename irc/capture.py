"""Capture a decoder LM as a graph with ``torch.export`` (non-strict).

The captured program is a logits-only wrapper ``(input_ids [B, T], attention_mask
[B, T]) -> logits [B, T, V]`` with dynamic batch and sequence axes. The mask is
an input so that padded batches (left or right padding) are routed correctly:
padding tokens are never executed work.

``torch.fx.symbolic_trace`` and transformers' HFTracer do not work on
transformers 5 models; ``torch.export`` does, and it tags every node with the
``nn_module_stack`` the routing pass reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.export import Dim, export
from torch.fx import GraphModule

MAX_BATCH = 1024


class LogitsOnly(torch.nn.Module):
    """``model(input_ids, attention_mask).logits`` with the KV cache off."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass
class Capture:
    gm: GraphModule
    seconds: float
    nodes: int


def capture(model: torch.nn.Module, *, max_seq: int | None = None) -> Capture:
    """Export ``model`` to a ``GraphModule`` taking ``(input_ids, attention_mask)``.

    ``max_seq`` bounds the dynamic sequence axis (default: the model's
    ``max_position_embeddings``).
    """
    config = model.config
    max_seq = max_seq or int(getattr(config, "max_position_embeddings", 0) or 8192)
    vocab = int(config.vocab_size)
    # An example of batch 2, length 7, with left padding: no size is 0 or 1, so
    # nothing specialises, and the mask path sees real padding.
    ids = torch.randint(0, min(vocab, 1000), (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    batch = Dim("batch", min=1, max=MAX_BATCH)
    seq = Dim("seq", min=1, max=max_seq)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    start = time.perf_counter()
    with torch.no_grad():
        ep = export(LogitsOnly(model).eval(), (ids, mask), dynamic_shapes=dynamic, strict=False)
    gm = ep.module()
    seconds = time.perf_counter() - start
    gm.meta["irc_capture"] = {"max_seq": max_seq, "max_batch": MAX_BATCH}
    return Capture(gm=gm, seconds=seconds, nodes=len(gm.graph.nodes))
