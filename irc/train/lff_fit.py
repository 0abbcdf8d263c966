"""Stage 1: fit each unit's forecaster to the unit it stands in for.

Teacher-forced: the routed model runs in ``dense`` mode (it is then the dense
model), and every unit's input ``a`` and output ``U(a)`` are observed on real,
non-sink tokens.

- ``closed-form`` (default): one streamed pass accumulates ``XᵀX`` and ``XᵀY``
  per unit (X = [a, 1]), solves the ridge regression ``W = (XᵀX + λI)⁻¹ XᵀY``,
  and reduces it to rank r along the top-r principal directions of the fitted
  outputs ``XW`` (reduced-rank regression): ``F(a) = ([a, 1] W V_r) V_rᵀ``. For a
  ``silu`` forecaster this initialises ``W1, b1, W2`` and ``refine_steps`` of
  SmoothL1 gradient steps follow.
- ``smoothl1``: the paper's fit, AdamW on SmoothL1(F(a), U(a)) from the paper's
  N(0, 1e-3) initialisation.

Sink tokens are excluded: their unit outputs are orders of magnitude larger
than other tokens' and would dominate the fit (and sinks always execute).

Legend: N observed tokens, D hidden, r rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from irc.data.windows import batches
from irc.nn.tokens import sink_mask
from irc.progress import progress
from irc.train.distributed import all_reduce_grads, broadcast_tensors, global_means, shard, world
from irc.train.observe import observing

FIT_METHODS = ("closed-form", "smoothl1")


@dataclass(frozen=True)
class LFFFitConfig:
    method: str = "closed-form"
    batch_size: int = 1
    ridge: float = 1e-3  # λ relative to the mean diagonal of XᵀX
    refine_steps: int = 0  # SmoothL1 steps after the closed form (silu forecasters)
    lr: float = 1e-3
    steps: int = 150  # smoothl1 only: gradient steps

    def __post_init__(self):
        if self.method not in FIT_METHODS:
            raise ValueError(f"method must be one of {', '.join(FIT_METHODS)}, got {self.method!r}")
        if self.ridge <= 0:
            raise ValueError(f"ridge must be positive, got {self.ridge}")


def _selected(unit, a, u, attention_mask):
    pad = attention_mask.bool()
    keep = pad & ~sink_mask(pad, unit.n_sink)  # [B, T]
    return a[keep].float(), u[keep].float()  # [N, D] each


class _Moments:
    def __init__(self, d: int):
        self.xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        self.xty = torch.zeros(d + 1, d, dtype=torch.float64)
        self.yty = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)  # [N, D+1]
        self.xtx += (x1.T @ x1).double()
        self.xty += (x1.T @ y).double()
        self.yty += float((y * y).sum())
        self.n += len(x)


@torch.no_grad()
def fit_closed_form(routed, windows: torch.Tensor, config: LFFFitConfig = LFFFitConfig(),
                    show_progress: bool = True) -> dict[str, dict]:
    """Fit every forecaster in closed form; returns per-unit fit statistics."""
    units = {n: u for n, u in routed.units.items() if u.forecaster is not None}
    moments = {n: _Moments(u.forecaster.w1.in_features) for n, u in units.items()}
    names = {id(u): n for n, u in units.items()}

    def observe(unit, x, a, u, attention_mask):
        xs, ys = _selected(unit, a, u, attention_mask)
        moments[names[id(unit)]].add(xs, ys)

    w = world()
    with observing(routed, units.values(), observe):
        bar = progress(total=len(windows), desc="LFF fit: statistics", unit="win", enabled=show_progress)
        for batch in batches(windows, config.batch_size):
            mine = shard(batch, w)
            if len(mine):
                routed(mine)
            bar.update(len(batch))
        bar.close()
    if w.distributed:
        return _solve_distributed(units, moments, config.ridge, w)
    stats = {}
    for name, unit in units.items():
        stats[name] = _solve(unit.forecaster, moments[name], config.ridge)
    return stats


def _solve_distributed(units: dict, moments: dict, ridge: float, w) -> dict[str, dict]:
    """Many processes: each unit's moments summed over ranks, unit i solved by rank i mod N, its
    forecaster broadcast from there (the solves run in parallel)."""
    import torch.distributed as dist

    stats: dict[str, dict] = {}
    for i, (name, unit) in enumerate(units.items()):
        m = moments[name]
        owner = i % w.size
        flat = torch.cat([m.xtx.reshape(-1), m.xty.reshape(-1), torch.tensor([m.yty, float(m.n)], dtype=torch.float64)])
        dist.reduce(flat, dst=owner)
        if w.rank == owner:
            k1, k2 = m.xtx.numel(), m.xty.numel()
            m.xtx, m.xty = flat[:k1].view_as(m.xtx), flat[k1 : k1 + k2].view_as(m.xty)
            m.yty, m.n = float(flat[-2]), int(flat[-1])
            stats[name] = _solve(unit.forecaster, m, ridge)
    for i, unit in enumerate(units.values()):
        broadcast_tensors(list(unit.forecaster.state_dict().values()), src=i % w.size)
    gathered = [None] * w.size
    dist.all_gather_object(gathered, stats)
    merged = {k: v for part in gathered for k, v in part.items()}
    return {name: merged[name] for name in units}


def _solve(forecaster, m: _Moments, ridge: float) -> dict:
    d = m.xty.shape[1]
    r = forecaster.w1.out_features
    lam = ridge * float(torch.diagonal(m.xtx)[:d].mean())
    reg = torch.eye(d + 1, dtype=torch.float64) * lam
    reg[d, d] = 0.0  # the bias is not shrunk
    W = torch.linalg.solve(m.xtx + reg, m.xty)  # [D+1, D]
    # top-r principal directions of the fitted outputs XW: eigenvectors of Wᵀ XᵀX W
    cov = W.T @ m.xtx @ W  # [D, D]
    _, vecs = torch.linalg.eigh(cov)
    V = vecs[:, -r:] if r < d else vecs  # [D, r']
    Wr = W @ V  # [D+1, r']
    residual = m.yty - 2 * float((Wr @ V.T * m.xty).sum()) + float(((V @ Wr.T) @ m.xtx @ (Wr @ V.T)).trace())
    with torch.no_grad():
        w1 = torch.zeros_like(forecaster.w1.weight, dtype=torch.float64)
        b1 = torch.zeros_like(forecaster.w1.bias, dtype=torch.float64)
        w2 = torch.zeros_like(forecaster.w2.weight, dtype=torch.float64)
        k = V.shape[1]
        w1[:k] = Wr[:d].T
        b1[:k] = Wr[d]
        w2[:, :k] = V
        forecaster.w1.weight.copy_(w1)
        forecaster.w1.bias.copy_(b1)
        forecaster.w2.weight.copy_(w2)
        forecaster.w2.bias.zero_()
    return {"tokens": m.n, "relative_error": (max(residual, 0.0) / max(m.yty, 1e-30)) ** 0.5}


def fit_smoothl1(routed, windows: torch.Tensor, config: LFFFitConfig = LFFFitConfig(), *,
                 init: bool = True, steps: int | None = None, show_progress: bool = True) -> dict[str, float]:
    """The paper's fit (or the refinement after the closed form): AdamW on SmoothL1(F(a), U(a))."""
    units = {n: u for n, u in routed.units.items() if u.forecaster is not None}
    params = []
    for u in units.values():
        if init:  # the paper's initialisation
            for lin in (u.forecaster.w1, u.forecaster.w2):
                torch.nn.init.normal_(lin.weight, 0.0, 1e-3)
                torch.nn.init.zeros_(lin.bias)
        u.forecaster.float()  # fp32 master weights while fitting
        params += list(u.forecaster.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    pairs: list = []

    def observe(unit, x, a, u, attention_mask):
        pairs.append((unit, *_selected(unit, a, u, attention_mask)))

    total = steps if steps is not None else config.steps
    w = world()
    bar = progress(total=total, desc="LFF fit: SmoothL1", unit="step", enabled=show_progress)
    last: dict[str, float] = {}
    try:
        with observing(routed, units.values(), observe):
            for step in range(total):
                start = (step * config.batch_size) % len(windows)
                batch = windows[start : start + config.batch_size]
                pairs.clear()
                if w.distributed:
                    loss = _sharded_smoothl1(routed, units, shard(batch, w), pairs)
                else:
                    with torch.no_grad():
                        routed(batch)  # teacher forcing: the dense model's (a, U(a)) of every unit
                    loss = torch.stack([F.smooth_l1_loss(unit.forecaster(xs), ys) for unit, xs, ys in pairs]).mean()
                optimizer.zero_grad()
                if loss.requires_grad:
                    loss.backward()
                all_reduce_grads(params)
                optimizer.step()
                last["loss"] = float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
    finally:
        bar.close()
        for u in units.values():
            u.forecaster.to(next(u.body.parameters()).dtype)
    return last


def _sharded_smoothl1(routed, units: dict, mine: torch.Tensor, pairs: list) -> torch.Tensor:
    """Many processes: the mean over units of SmoothL1 over the global batch, from this rank's rows
    (per-unit means weighted by element counts, ``global_means``); gradient through the local means."""
    if len(mine):
        with torch.no_grad():
            routed(mine)
    got = {id(unit): (xs, ys) for unit, xs, ys in pairs}
    means, counts = [], []
    for unit in units.values():
        if id(unit) in got:
            xs, ys = got[id(unit)]
            means.append(F.smooth_l1_loss(unit.forecaster(xs), ys))
            counts.append(float(ys.numel()))
        else:  # an empty shard
            means.append(torch.zeros(()))
            counts.append(0.0)
    return global_means(torch.stack(means), torch.tensor(counts)).mean()


@torch.no_grad()
def forecaster_errors(routed, windows: torch.Tensor, batch_size: int = 1) -> dict[str, float]:
    """Per unit: ‖F(a) − U(a)‖ / ‖U(a)‖ over the real, non-sink tokens of ``windows``."""
    sums: dict[str, list[float]] = {}
    names = {id(u): n for n, u in routed.units.items()}

    def observe(unit, x, a, u, attention_mask):
        xs, ys = _selected(unit, a, u, attention_mask)
        f = unit.forecaster(xs.to(a.dtype)).float() if unit.forecaster is not None else torch.zeros_like(ys)
        acc = sums.setdefault(names[id(unit)], [0.0, 0.0])
        acc[0] += float(((f - ys) ** 2).sum())
        acc[1] += float((ys**2).sum())

    with observing(routed, routed.units.values(), observe):
        for batch in batches(windows, batch_size):
            routed(batch)
    return {n: (e / max(t, 1e-30)) ** 0.5 for n, (e, t) in sums.items()}
