"""Stage 3: train the routers (everything else frozen).

Loss ``CE_LM + 8·|target − ē| + 0.1·cosreg`` (see ``losses``; target ``1 − s``
for unit sparsity, or a FLOP budget's weighted execute fraction), hard Gumbel-softmax
gates with a straight-through gradient, temperature annealed linearly from
``tau_start`` to ``tau_end``; AdamW with a cosine or constant schedule and
gradient accumulation. Routers train in fp32 (a bf16 model keeps bf16
activations); they are cast back to the model's dtype afterwards.

A ``RouterTrainState`` (step, router and optimizer state, the RNG state) is
handed to ``on_checkpoint`` every ``checkpoint_every`` steps; passing it back as
``resume`` continues exactly where it stopped: data order is a function of the
step, and the Gumbel noise comes from the restored RNG.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from irc.progress import progress
from irc.train.distributed import (
    all_reduce_grads,
    global_means,
    require_rows,
    shard,
    sharded_gumbel,
    sum_unit_counters,
    world,
)
from irc.train.losses import lm_loss, routing_terms


@dataclass(frozen=True)
class RouterTrainConfig:
    sparsity: float
    steps: int = 100
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = 5
    grad_accum: int = 1
    tau_start: float = 5.0
    tau_end: float = 1.0
    sparsity_weight: float = 8.0
    cos_weight: float = 0.1
    checkpoint_every: int = 20
    # a compute budget (irc.eval.flops.Budget): ē weighted per unit name, aiming at its target;
    # None: the paper's unit sparsity (equal weights, target 1 − sparsity)
    budget: object | None = None

    @property
    def exec_target(self) -> float:
        return self.budget.target if self.budget is not None else 1.0 - self.sparsity

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be positive")

    def tau(self, step: int) -> float:
        frac = step / max(self.steps - 1, 1)
        return self.tau_start + (self.tau_end - self.tau_start) * frac

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress_ = (step - self.warmup) / max(self.steps - self.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * progress_))


@dataclass
class RouterTrainState:
    step: int = 0
    routers: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    rng: torch.Tensor | None = None
    history: list = field(default_factory=list)


def _routers(routed) -> dict[str, torch.nn.Module]:
    return {name: u.router for name, u in routed.units.items()}


def train_routers(routed, windows: torch.Tensor, config: RouterTrainConfig, *, resume: RouterTrainState | None = None,
                  on_checkpoint=None, show_progress: bool = True) -> RouterTrainState:
    """Train every unit's router on ``windows [N, T]``; returns the final state."""
    routers = _routers(routed)
    base_dtype = next(iter(routers.values())).fc1.weight.dtype
    for p in routed.gm.parameters():
        p.requires_grad_(False)
    params = []
    for r in routers.values():
        r.float()
        for p in r.parameters():
            p.requires_grad_(True)
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    state = resume or RouterTrainState()
    if resume is not None:
        for name, r in routers.items():
            r.load_state_dict({k[len(name) + 1 :]: v for k, v in resume.routers.items() if k.startswith(name + ".")})
        optimizer.load_state_dict(resume.optimizer)
        torch.set_rng_state(resume.rng)
    units = list(routed.units.values())
    weights = None
    if config.budget is not None:
        weights = [config.budget.weights[name] for name in routed.units]
    w = world()
    require_rows(config.batch_size, "router training", w)
    bar = progress(total=config.steps, desc="router training", unit="step", enabled=show_progress)
    bar.update(state.step)
    try:
        while state.step < config.steps:
            step = state.step
            tau = config.tau(step)
            routed.set_routing("train", tau=tau, capacity=config.exec_target, record=True)
            routed.reset_stats()
            for group in optimizer.param_groups:
                group["lr"] = config.lr * config.lr_factor(step)
            optimizer.zero_grad()
            totals = {"loss": 0.0, "ce": 0.0, "exec": 0.0}
            for micro in range(config.grad_accum):
                idx = (step * config.grad_accum + micro) * config.batch_size
                batch = torch.stack([windows[(idx + i) % len(windows)] for i in range(config.batch_size)])
                if w.distributed:
                    with sharded_gumbel(routed, len(batch)):
                        loss, ce, e_bar = _sharded_loss(routed, units, weights, shard(batch, w), config)
                else:
                    mask = torch.ones_like(batch)
                    logits = routed(batch, mask)
                    ce = lm_loss(logits, batch, mask)
                    loss = ce
                    e_bar, cos = routing_terms(units, weights)
                    if e_bar is not None:
                        loss = loss + config.sparsity_weight * (config.exec_target - e_bar).abs() + config.cos_weight * cos
                if e_bar is not None:
                    totals["exec"] += float(e_bar.detach()) / config.grad_accum
                (loss / config.grad_accum).backward()
                totals["loss"] += float(loss.detach()) / config.grad_accum
                totals["ce"] += float(ce.detach()) / config.grad_accum
            all_reduce_grads(params)
            optimizer.step()
            state.step += 1
            sum_unit_counters(routed)
            kinds = _fractions_by_kind(units)
            state.history.append({"step": state.step, "tau": round(tau, 3), **{k: round(v, 4) for k, v in totals.items()},
                                  **{f"exec_{k}": round(v, 4) for k, v in kinds.items()}})
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.3f}", tau=f"{tau:.2f}",
                            **{f"exec_{k}": f"{v:.2f}" for k, v in kinds.items()})
            if on_checkpoint is not None and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
                on_checkpoint(_snapshot(state, routers, optimizer))
    finally:
        bar.close()
        for r in routers.values():
            for p in r.parameters():
                p.requires_grad_(False)
            r.to(base_dtype)
        routed.set_routing("dense")
    return state


def _sharded_loss(routed, units: list, weights, mine: torch.Tensor, config: RouterTrainConfig):
    """Many processes: the global batch's loss ``(loss, ce, ē)`` from this rank's rows ``mine``.

    Every term is a mean over real tokens (CE; each unit's execute fraction and
    cosreg), computed locally as ``lm_loss`` / ``routing_terms`` do and weighted by token
    counts in ``global_means``: the value is the global batch's on every rank and the
    ranks' summed gradients are its gradient.
    """
    mask = torch.ones_like(mine)
    logits = routed(mine, mask)
    scored = (mask[:, 1:].bool() & mask[:, :-1].bool()).sum()
    ce = global_means(lm_loss(logits, mine, mask)[None], scored[None])[0]
    gates, cos, counts, used = [], [], [], []
    for i, u in enumerate(units):
        gate = getattr(u, "last_gate", None)
        if gate is None:
            continue
        g, real = gate
        gates.append((g * real).sum() / real.sum().clamp(min=1))  # as routing_terms
        cos.append(u.last_cosreg)
        counts.append(real.sum())
        used.append(i)
        u.last_gate = u.last_cosreg = None
    if not used:
        return ce, ce, None
    counts_ = torch.stack(counts)
    means = global_means(torch.cat([torch.stack(gates), torch.stack(cos)]), torch.cat([counts_, counts_]))
    e_units, cos = means[: len(used)], means[len(used) :].mean()
    if weights is None:
        e_bar = e_units.mean()
    else:
        wts = torch.tensor([weights[i] for i in used], dtype=e_units.dtype)
        e_bar = (e_units * wts).sum() / wts.sum()
    loss = ce + config.sparsity_weight * (config.exec_target - e_bar).abs() + config.cos_weight * cos
    return loss, ce, e_bar


def _snapshot(state: RouterTrainState, routers, optimizer) -> RouterTrainState:
    return RouterTrainState(
        step=state.step,
        routers={f"{n}.{k}": v.detach().clone() for n, r in routers.items() for k, v in r.state_dict().items()},
        optimizer=copy.deepcopy(optimizer.state_dict()),
        rng=torch.get_rng_state(),
        history=list(state.history),
    )


def _fractions_by_kind(units) -> dict[str, float]:
    by: dict[str, list[int]] = {}
    for u in units:
        acc = by.setdefault(u.kind, [0, 0])
        acc[0] += u.executed
        acc[1] += u.tokens
    return {k: e / t for k, (e, t) in by.items() if t}


def save_state(state: RouterTrainState, path) -> None:
    """Write a checkpoint as one safetensors file: tensors, with the rest as JSON metadata.

    Nothing executable: ``load_state`` reads tensors and JSON only (no pickle).
    """
    import json

    from safetensors.torch import save

    from irc.cache import atomic_file

    tensors = {f"routers.{k}": v.detach().contiguous().cpu() for k, v in state.routers.items()}
    scalars: dict = {}
    for idx, slot in state.optimizer.get("state", {}).items():
        for k, v in slot.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    if state.rng is not None:
        tensors["rng"] = state.rng
    meta = {"step": state.step, "history": state.history,
            "param_groups": state.optimizer.get("param_groups", []), "optim_scalars": scalars}
    with atomic_file(path, "wb") as f:
        f.write(save(tensors, metadata={"irc_router_state": json.dumps(meta)}))


def load_state(path) -> RouterTrainState:
    """Read a checkpoint written by ``save_state``; a damaged file is a ``UserError``."""
    import json

    from safetensors import safe_open

    from irc.errors import UserError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["irc_router_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any failure to parse means the file is unusable
        raise UserError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}); "
                        "run without --resume to start over") from None
    optim_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            idx, name = k[len("optim."):].split(".", 1)
            optim_state.setdefault(int(idx), {})[name] = v
    for k, v in meta["optim_scalars"].items():
        idx, name = k.split(".", 1)
        optim_state.setdefault(int(idx), {})[name] = v
    return RouterTrainState(
        step=meta["step"],
        routers={k[len("routers."):]: v for k, v in tensors.items() if k.startswith("routers.")},
        optimizer={"state": optim_state, "param_groups": meta["param_groups"]},
        rng=tensors.get("rng"),
        history=meta["history"],
    )
