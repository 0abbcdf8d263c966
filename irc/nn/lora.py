"""LoRA on the outlined units' projections: ``W' = W + (α / r) · B A``.

The outlined units call ``aten.linear`` on weights they own (no ``nn.Linear``
modules), which is why this is not PEFT: each target weight gets a
parametrization that adds the low-rank delta. A unit's body and its attention
kv/query parts own the same weight tensors, so one ``LoRADelta`` per weight is
registered on every part that reads it: all paths see the same adapted weight.
``B`` starts at zero, so attaching LoRA changes nothing until it is trained.

``merged_lora`` hands an export one tensor per adapted weight instead of the
product. Traced, the delta is ``MatMul(B, A)``, ``Mul``, ``Add`` (and a
``Transpose``) in the graph, inside the decode files' ``If`` branches too: the
file then relies on the runtime to fold them into constants. ONNX Runtime does,
outer scope included (the decode step's speed did not move when the merge came,
``docs/results/ort_branch_cost.md``); merged, the file holds the weights that run
and no B or A (SmolLM2's dense decode file: 546 → 539 MB).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def merged_lora(root: nn.Module):
    """Within the block, every LoRA-adapted weight under ``root`` is one plain parameter ``W + (α/r)·BA``.

    For tracing and export: ``module.weight`` still goes through its parametrization, whose original
    is swapped for the merged tensor and whose deltas for identities, so a capture sees a parameter,
    not the product. Parts that share a weight share its merged tensor. Everything is put back on
    exit (the same ``original`` parameters and deltas); nothing trains inside the block.
    """
    lists = [m.parametrizations["weight"] for m in root.modules()
             if parametrize.is_parametrized(m, "weight")
             and any(isinstance(p, LoRADelta) for p in m.parametrizations["weight"])]
    merged: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for plist in lists:
            if id(plist.original) not in merged:
                merged[id(plist.original)] = nn.Parameter(plist().detach().clone(), requires_grad=False)
    saved = [(plist, plist.original, list(plist)) for plist in lists]
    try:
        for plist, original, deltas in saved:
            plist.original = merged[id(original)]
            for i in range(len(deltas)):
                plist[i] = nn.Identity()
        yield
    finally:
        for plist, original, deltas in saved:
            plist.original = original
            for i, delta in enumerate(deltas):
                plist[i] = delta
