"""The Lightweight Feature Forecaster (LFF): a cheap predictor of a unit's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from irc.nn.small_linear import small_linear


class Forecaster(nn.Module):
    """``F(a) = W2 · act(W1 · a + b1) + b2`` with rank r; ``act`` is SiLU (the paper's form)
    or the identity (a reduced-rank linear map, what the closed-form fit produces).

    ``W2`` and ``b2`` start at zero, so an unfitted forecaster predicts 0: an
    approximated token then behaves as if the unit were skipped. The LFF fit
    (issue #4) replaces these weights.
    """

    def __init__(self, hidden: int, rank: int, dtype: torch.dtype = torch.float32,
                 activation: str = "silu"):
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(hidden, rank, dtype=dtype)
        self.w2 = nn.Linear(rank, hidden, dtype=dtype)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        h = self.w1(a)
        return self.w2(F.silu(h) if self.activation == "silu" else h)

    def step(self, a: torch.Tensor) -> torch.Tensor:
        """``forward`` for the few rows of a decode step (``small_linear``)."""
        h = small_linear(a, self.w1.weight, self.w1.bias)
        return small_linear(F.silu(h) if self.activation == "silu" else h, self.w2.weight, self.w2.bias)

    def flops_per_token(self) -> int:
        return 2 * (self.w1.weight.numel() + self.w2.weight.numel())
