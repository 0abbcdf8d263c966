"""A linear layer on the few rows of a decode step: the routers and forecasters of a bf16 model on the CPU.

On the CPU, ``F.linear`` of bf16 rows goes through oneDNN, whose per-call setup
dominates at the shapes of a router (576 → 72 → 2) or a forecaster (576 → 100 → 576)
applied to one token: 29–39 µs per call against 6.6–10.7 µs for the same product as a
matrix–vector product (``mv``, then the bias) with oneDNN off for that call (SmolLM2-135M's shapes,
best of 30 × 100 calls, 2 cores). At batch 1 a routed unit's routing work is two or four
such calls, so with oneDNN it costs more than a small skipped unit saves.

``small_linear`` switches oneDNN off around the one call (0.2 µs), bf16 on the CPU only;
fp32 (BLAS, no such setup cost) and other devices take ``F.linear`` unchanged, so
fp32 results stay bit-identical to the general path's. Only the decode step's eager
fast paths call it; a prompt (many rows) and traced or exported graphs keep ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows ``x [..., D]`` (one row: a matrix–vector product)."""
    if weight.dtype != torch.bfloat16 or x.device.type != "cpu" or not torch._C._get_mkldnn_enabled():
        return F.linear(x, weight, bias)
    torch._C._set_mkldnn_enabled(False)
    try:
        if x.numel() == x.shape[-1]:  # one row; mv, then the bias (bf16 addmv: 38 µs, mv + add: 10)
            y = torch.mv(weight, x.reshape(-1))
            return (y if bias is None else y + bias).view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(True)
