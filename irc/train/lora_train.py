"""Stage 4 (optional): LoRA on the units' projections, routers frozen.

Next-token cross-entropy with routing on (hard Gumbel gates at τ = 1, the
routers' final temperature, so the model learns to live with the routing it
will get); only the LoRA ``A`` and ``B`` matrices train (AdamW, cosine schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from irc.progress import progress
from irc.train.losses import lm_loss, routing_terms


@dataclass(frozen=True)
class LoRATrainConfig:
    steps: int = 100
    batch_size: int = 2
    lr: float = 1e-4
    tau: float = 1.0
    # "train": hard Gumbel gates at ``tau`` (the routed model learns to live with its routing);
    # "dense": every unit runs (LoRA on the dense model: the reference for what the data alone buys)
    routing: str = "train"

    def __post_init__(self):
        if self.routing not in ("train", "dense"):
            raise ValueError(f"routing must be train or dense, got {self.routing!r}")


def train_lora(routed, windows: torch.Tensor, config: LoRATrainConfig, *, show_progress: bool = True) -> dict:
    params = [p for u in routed.units.values() if getattr(u, "lora", None) is not None for p in u.lora.parameters()]
    if not params:
        raise ValueError("the routed model has no LoRA (route it with lora_rank > 0)")
    for p in routed.gm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if len(windows) == 0:
        raise ValueError("LoRA training needs at least one window")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    bar = progress(total=config.steps, desc="LoRA", unit="step", enabled=show_progress)
    first = last = None
    try:
        for step in range(config.steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            if config.routing == "dense":
                routed.set_routing("dense", record=False)
            else:
                routed.set_routing("train", tau=config.tau, record=False)
            idx = step * config.batch_size
            batch = torch.stack([windows[(idx + i) % len(windows)] for i in range(config.batch_size)])
            mask = torch.ones_like(batch)
            loss = lm_loss(routed(batch, mask), batch, mask)
            routing_terms(routed.units.values())  # clears the gates the units kept for the router loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            last = float(loss.detach())
            first = last if first is None else first
            bar.update(1)
            bar.set_postfix(ce=f"{last:.3f}")
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
        routed.set_routing("dense", record=True)
    return {"steps": config.steps, "first_ce": first, "last_ce": last}
