"""The router: per token, logits for [execute, approximate]."""

from __future__ import annotations

import torch
from torch import nn

from irc.nn.small_linear import small_linear


class Router(nn.Module):
    """``Linear(D, H) → ReLU → Linear(H, 2)``; logits ``[exec, approx]`` per token.

    The output layer starts at zero, so an untrained router's margin is 0 and
    ``threshold`` mode (θ = 0) executes everything: a freshly routed model
    behaves exactly like the dense one until it is trained.
    """

    def __init__(self, hidden: int, width: int, dtype: torch.dtype = torch.float32, outputs: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(hidden, width, dtype=dtype)
        self.fc2 = nn.Linear(width, outputs, dtype=dtype)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, outputs]
        # routers may be kept in fp32 while training a bf16 model
        return self.fc2(torch.relu(self.fc1(a.to(self.fc1.weight.dtype))))

    def logits(self, a: torch.Tensor) -> torch.Tensor:
        """``forward`` without the module-call machinery (hooks, dispatch), for the few rows of a
        decode step, where a unit's routing work is a handful of tiny ops (``small_linear``)."""
        h = small_linear(a.to(self.fc1.weight.dtype), self.fc1.weight, self.fc1.bias)
        return small_linear(torch.relu(h), self.fc2.weight, self.fc2.bias)
