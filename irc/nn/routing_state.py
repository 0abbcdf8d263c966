"""Routing settings and counters shared by routed units and routed layers."""

from __future__ import annotations

import torch
from torch import nn

from irc.plan import MODES


class RoutingState(nn.Module):
    """Mode, its settings, and the executed/real token counters of one routed module.

    Counters are Python ints updated in the forward pass when ``record`` is True
    (turn it off for capture or export: they read tensor values).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.mode = "dense"
        self.sparse = True
        self.tau = 1.0
        self.capacity = 1.0
        self.forced_mask: torch.Tensor | None = None
        self.record = True
        # export: no Python branches on tensor values (capacity: static shapes; threshold: one
        # data-dependent count per unit), see RoutedUnit._traceable
        self.traceable = False
        self.executed = 0
        self.tokens = 0

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode

    def reset_stats(self) -> None:
        self.executed = self.tokens = 0

    @property
    def execute_fraction(self) -> float | None:
        return self.executed / self.tokens if self.tokens else None

    def _count(self, execute: torch.Tensor, pad: torch.Tensor) -> None:
        if self.record:
            self.executed += int(execute.sum())
            self.tokens += int(pad.sum())
