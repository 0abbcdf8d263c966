"""What a pass returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule


@dataclass
class PassResult:
    module: GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)
