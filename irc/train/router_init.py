"""Stage 2 (optional): start the routers as classifiers of forecast error.

With fitted forecasters, the tokens whose unit output the forecaster recovers
best (lowest ``‖F(a) − U(a)‖ / ‖x‖``, the error relative to the residual stream
it lands in) are labelled "approximate", the target fraction ``s`` of each
unit's non-sink tokens in every batch, the rest "execute"; each router is
trained with a logistic loss on its margin. Router training (stage 3) then
starts from routers that already point at recoverable tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irc.data.windows import batches
from irc.nn.tokens import sink_mask
from irc.progress import progress
from irc.train.distributed import all_gather_cat, all_reduce_grads, global_means, shard, world
from irc.train.observe import observing


def init_routers(routed, windows: torch.Tensor, sparsity: float, *, lr: float = 3e-3, epochs: int = 2,
                 batch_size: int = 1, show_progress: bool = True) -> dict:
    units = {n: u for n, u in routed.units.items() if u.forecaster is not None}
    if not units:
        return {"skipped": "no forecasters"}
    base_dtype = next(iter(units.values())).router.fc1.weight.dtype
    params = []
    for u in units.values():
        u.router.float()
        for p in u.router.parameters():
            p.requires_grad_(True)
            params.append(p)
    optimizer = torch.optim.Adam(params, lr=lr)
    observed: list = []

    def observe(unit, x, a, u, attention_mask):
        with torch.no_grad():
            pad = attention_mask.bool()
            keep = pad & ~sink_mask(pad, unit.n_sink)
            err = (unit.forecaster(a).float() - u.float()).norm(dim=-1) / x.float().norm(dim=-1).clamp(min=1e-6)
            observed.append((unit, a[keep].detach(), err[keep]))

    total = epochs * ((len(windows) + batch_size - 1) // batch_size)
    w = world()
    bar = progress(total=total, desc="router init", unit="batch", enabled=show_progress)
    last = 0.0
    try:
        with observing(routed, units.values(), observe):
            for _ in range(epochs):
                for batch in batches(windows, batch_size):
                    observed.clear()
                    if w.distributed:
                        loss = _sharded_step(routed, units, shard(batch, w), observed, sparsity)
                        optimizer.zero_grad()
                        if loss.requires_grad:
                            loss.backward()
                        all_reduce_grads(params)
                        optimizer.step()
                        last = float(loss.detach())
                        bar.update(1)
                        bar.set_postfix(bce=f"{last:.3f}")
                        continue
                    with torch.no_grad():
                        routed(batch)
                    losses = []
                    for unit, a, err in observed:
                        k = int(sparsity * len(err))
                        target = torch.ones_like(err)  # 1 = execute
                        if k:
                            target[torch.topk(err, k, largest=False).indices] = 0.0
                        logits = unit.router(a)
                        margin = (logits[:, 0] - logits[:, 1]).float()
                        losses.append(F.binary_cross_entropy_with_logits(margin, target))
                    loss = torch.stack(losses).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    last = float(loss.detach())
                    bar.update(1)
                    bar.set_postfix(bce=f"{last:.3f}")
    finally:
        bar.close()
        for u in units.values():
            for p in u.router.parameters():
                p.requires_grad_(False)
            u.router.to(base_dtype)
    return {"bce": last}


def _sharded_step(routed, units: dict, mine: torch.Tensor, observed: list, sparsity: float) -> torch.Tensor:
    """Many processes: one step's loss on the global batch from this rank's rows ``mine``.

    The labels are the global batch's: each unit's errors are gathered from every rank
    (in rank order, which is the batch's order) and the ``k`` lowest of the whole batch
    are "approximate", exactly the single-process labels; each unit's BCE is a mean over
    this rank's tokens, weighted by token counts (``global_means``). A rank with
    no rows (a batch smaller than the number of processes) contributes nothing.
    """
    if len(mine):
        with torch.no_grad():
            routed(mine)
    got = {id(unit): (a, err) for unit, a, err in observed}
    ordered = [(u, *got.get(id(u), (None, torch.zeros(0)))) for u in units.values()]
    everyone = all_gather_cat([err.float() for _, _, err in ordered])
    lengths = all_gather_cat([torch.tensor([float(len(err))]) for _, _, err in ordered])  # [N] per unit
    rank = world().rank
    means = []  # each unit's mean BCE over this rank's tokens
    for (unit, a, err), full, per_rank in zip(ordered, everyone, lengths, strict=True):
        if a is None or len(err) == 0:
            means.append(torch.zeros(()))
            continue
        offset = int(per_rank[:rank].sum())
        k = int(sparsity * len(full))
        target = torch.ones_like(err)  # 1 = execute
        if k:
            chosen = torch.topk(full.to(err.dtype), k, largest=False).indices - offset
            target[chosen[(chosen >= 0) & (chosen < len(err))]] = 0.0
        logits = unit.router(a)
        margin = (logits[:, 0] - logits[:, 1]).float()
        means.append(F.binary_cross_entropy_with_logits(margin, target))
    return global_means(torch.stack(means), torch.tensor([float(len(err)) for _, _, err in ordered])).mean()
