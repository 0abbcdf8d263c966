"""LoRA on the outlined units' projections: ``W' = W + (α / r) · B A``.

The outlined units call ``aten.linear`` on weights they own (no ``nn.Linear``
modules), which is why this is not PEFT: each target weight gets a
parametrization that adds the low-rank delta. A unit's body and its attention
kv/query parts own the same weight tensors, so one ``LoRADelta`` per weight is
registered on every part that reads it: all paths see the same adapted weight.
``B`` starts at zero, so attaching LoRA changes nothing until it is trained.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


class LoRADelta(nn.Module):
    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, dtype: torch.dtype):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dtype = dtype

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.scale * (self.B @ self.A)).to(weight.dtype)


def attach_lora(unit: nn.Module, parts: dict, rank: int, alpha: float, targets: tuple[str, ...]) -> nn.ModuleDict:
    """Register one shared ``LoRADelta`` per target weight on every part that owns it."""
    deltas: dict[str, LoRADelta] = {}
    for gm in parts.values():
        for target in targets:
            owner = getattr(gm, target, None)
            if owner is None or not hasattr(owner, "weight"):
                continue
            if target not in deltas:
                w = owner.weight
                deltas[target] = LoRADelta(w.shape[0], w.shape[1], rank, alpha, w.dtype)
            parametrize.register_parametrization(owner, "weight", deltas[target], unsafe=True)
    return nn.ModuleDict(deltas)
