"""A linear layer on the few rows of a decode step: the routers and forecasters of a bf16 model on the CPU.

On the CPU, ``F.linear`` of bf16 rows goes through oneDNN, whose per-call setup
dominates at the shapes of a router (576 → 72 → 2) or a forecaster (576 → 100 → 576)
applied to one token: 29–39 µs per call against 10–15 µs for the same ``F.linear``
with oneDNN off for that call, through ATen's own bf16 kernel (SmolLM2-135M's shapes,
best of 30 × 100 calls, 2 cores). At batch 1 a routed unit's routing work is two or
four such calls, so with oneDNN it costs more than a small skipped unit saves. A
matrix–vector product (``mv``) would be faster still (6.6–10.7 µs), but adding the bias
after its bf16 rounding loses up to 2% where the bias cancels the product: enough to
flip routing decisions (tests/nn/test_small_linear.py).

At 8 rows oneDNN is as fast or faster (576 → 100: 67 µs against ATen's 138), so only a
single row leaves it. ``small_linear`` switches oneDNN off around that one call (0.2 µs),
for one bf16 row on the CPU only; fp32 (BLAS, no such setup cost), several rows and other
devices take ``F.linear`` unchanged, so fp32 results stay bit-identical to the general
path's. Only the decode step's eager fast paths call it; a prompt and traced or exported
graphs keep ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the few rows ``x [..., D]`` of a decode step."""
    if (weight.dtype != torch.bfloat16 or x.numel() != x.shape[-1] or x.device.type != "cpu"
            or not torch._C._get_mkldnn_enabled()):
        return F.linear(x, weight, bias)
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)  # ATen's own bf16 GEMM: the bias added before the one rounding
    finally:
        torch._C._set_mkldnn_enabled(True)
