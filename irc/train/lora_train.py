"""Stage 4 (optional): LoRA on the units' projections, routers frozen.

The loss is next-token cross-entropy, optionally mixed with distillation from a
teacher (``distill`` w: ``(1 − w)·CE + w·KL(teacher ‖ student)``, the teacher
being the dense base model). Routing during training (``routing``):

- ``train``: hard Gumbel gates at ``tau`` (the routers' final temperature), the
  paper's stage 4: the model learns to live with noisy routing;
- ``threshold``: the calibrated thresholds, the decisions the model will make at
  inference, run sparsely as inference runs them (the gather/scatter ops carry
  gradients: the same as blending, and cheaper); calibrate before and after;
- ``dense``: every unit runs (LoRA on the dense model: what the data alone buys).

Only the LoRA ``A`` and ``B`` matrices train (AdamW, cosine schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from irc.progress import progress
from irc.train.distributed import (
    all_reduce_grads,
    global_means,
    require_rows,
    shard,
    sharded_gumbel,
    world,
)
from irc.train.losses import lm_loss, routing_terms


@dataclass(frozen=True)
class LoRATrainConfig:
    steps: int = 100
    batch_size: int = 2
    lr: float = 1e-4
    tau: float = 1.0
    routing: str = "train"  # train | threshold | dense (the module docstring)
    distill: float = 0.0  # weight of KL(teacher ‖ student) in the loss; needs a teacher

    def __post_init__(self):
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], got {self.distill}")


ROUTINGS = ("train", "threshold", "dense")


def distill_loss(logits: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of KL(teacher ‖ student) of the next-token distributions."""
    real = attention_mask.bool()
    s = torch.log_softmax(logits[real].float(), dim=-1)
    t = torch.log_softmax(teacher[real].float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _sharded_loss(routed, mine: torch.Tensor, config: LoRATrainConfig, teacher) -> torch.Tensor:
    """Many processes: the global batch's loss from this rank's rows (token-weighted means)."""
    mask = torch.ones_like(mine)
    logits = routed(mine, mask)
    scored = (mask[:, 1:].bool() & mask[:, :-1].bool()).sum().float()
    loss = global_means(lm_loss(logits, mine, mask)[None], scored[None])[0]
    if config.distill > 0:
        with torch.no_grad():
            target = teacher(mine)
        kl = global_means(distill_loss(logits, target, mask)[None], mask.sum().float()[None])[0]
        loss = (1 - config.distill) * loss + config.distill * kl
    return loss


def _set_routing(routed, config: LoRATrainConfig) -> None:
    if config.routing == "dense":
        routed.set_routing("dense", record=False)
    elif config.routing == "threshold":
        routed.set_routing("threshold", sparse=True, record=False)
    else:
        routed.set_routing("train", tau=config.tau, record=False)


def train_lora(routed, windows: torch.Tensor, config: LoRATrainConfig, *, teacher=None,
               show_progress: bool = True) -> dict:
    """Train the LoRA deltas of ``routed`` on ``windows``; ``teacher(ids) → logits`` (no
    gradient; the dense base model) when ``config.distill > 0``."""
    if config.distill > 0 and teacher is None:
        raise ValueError("distillation (distill > 0) needs a teacher")
    # folded units keep their LoRA deltas: after folding (``refine_folded``) those train too
    units = [*routed.units.values(), *getattr(routed, "folded", {}).values()]
    params = [p for u in units if getattr(u, "lora", None) is not None for p in u.lora.parameters()]
    if not params:
        raise ValueError("the routed model has no LoRA (route it with lora_rank > 0)")
    for p in routed.gm.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if len(windows) == 0:
        raise ValueError("LoRA training needs at least one window")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    w = world()
    require_rows(config.batch_size, "LoRA", w)
    bar = progress(total=config.steps, desc="LoRA", unit="step", enabled=show_progress)
    first = last = None
    try:
        for step in range(config.steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            _set_routing(routed, config)
            idx = step * config.batch_size
            batch = torch.stack([windows[(idx + i) % len(windows)] for i in range(config.batch_size)])
            if w.distributed:  # this rank's rows; the global batch's loss (irc.train.distributed)
                with sharded_gumbel(routed, len(batch)):
                    loss = _sharded_loss(routed, shard(batch, w), config, teacher)
            else:
                mask = torch.ones_like(batch)
                logits = routed(batch, mask)
                loss = lm_loss(logits, batch, mask)
                if config.distill > 0:
                    with torch.no_grad():
                        target = teacher(batch)
                    loss = (1 - config.distill) * loss + config.distill * distill_loss(logits, target, mask)
            routing_terms(routed.units.values())  # clears the gates the units kept for the router loss
            optimizer.zero_grad()
            loss.backward()
            all_reduce_grads(params)
            optimizer.step()
            last = float(loss.detach())
            first = last if first is None else first
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}")
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
        routed.set_routing("dense", record=True)
    return {"steps": config.steps, "routing": config.routing, "distill": config.distill, "lr": config.lr,
            "first_loss": first, "last_loss": last}
