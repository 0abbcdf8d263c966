"""Conversion on many processes: every torch.distributed helper irc uses, in one place.

``torchrun --nproc-per-node N -m irc convert …`` (or ``irc convert --nproc N``) runs
the same job in N processes. irc trains small modules (routers, forecasters, LoRA)
on a frozen base, so plain data parallelism is enough:

- the configuration's batch is the *global* batch: each stage splits every batch
  into contiguous row shards (``shard_slice``), rank r taking rows
  ``[r·B//N, (r+1)·B//N)``; ``N`` processes with shards of b rows compute what one
  process computes with batch ``N·b`` (float summation order aside);
- losses and statistics are means over tokens (CE over real tokens, execute fractions,
  cosreg, BCE): each rank computes its local means as one process would, and
  ``global_means`` weights them by token counts into the global means, whose
  gradient flows through the local means only, so the *sum* of the ranks'
  gradients is the gradient of the global loss;
- gradients: one flattened all-reduce (sum) of the trainable parameters' gradients
  (``all_reduce_grads``), not DistributedDataParallel. DDP would broadcast every
  parameter of the frozen base at construction (gigabytes for an 8B base), needs
  ``find_unused_parameters`` where a unit goes unused, and averages gradients by
  the number of ranks, which is wrong for token-weighted losses over uneven
  shards. The trainable parameters are a few MB: one bucket, one collective;
- forecaster moments (XᵀX, XᵀY) are summed over ranks; unit i is solved by rank
  ``i mod N`` and its forecaster broadcast from there (the solves run in parallel);
- random numbers: every rank holds the same generator state (same seed, same
  draws); hard Gumbel gates draw the noise of the whole global batch and keep
  their rows (``ShardedGumbel``), so the noise a token sees does not depend on N;
- rank 0 alone reads and writes the work directory and OUT (``on_main``); what
  it read reaches the others by broadcast, so no shared filesystem is needed for
  checkpoints; a failure there raises the same ``UserError`` on every rank.

With one process (no process group) every helper is the identity and the stages
take their single-process code paths unchanged.

Legend: B global batch rows, b this rank's rows, N processes (world size).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from irc.errors import UserError

# --- the process group ------------------------------------------------------


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_world_size() -> int:
    """The world size a launcher (torchrun) announced in the environment; 1 when none did."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextlib.contextmanager
def process_group(init_method: str = "env://", *, rank: int | None = None, size: int | None = None,
                  timeout_s: float = 1800.0):
    """Join (and at the end leave) a process group when there is more than one process.

    Under torchrun the environment says who we are (``env://``); tests pass a
    ``file://`` rendezvous with an explicit rank and size. The backend is gloo: the
    conversion runs its models on the CPU today (NCCL needs CUDA tensors).
    """
    import datetime

    import torch.distributed as dist

    size = launched_world_size() if size is None else size
    if size <= 1 or dist.is_initialized():
        yield world()
        return
    kwargs = {} if rank is None else {"rank": rank, "world_size": size}
    dist.init_process_group("gloo", init_method=init_method, timeout=datetime.timedelta(seconds=timeout_s),
                            **kwargs)
    try:
        yield world()
    finally:
        dist.destroy_process_group()


# --- sharding -----------------------------------------------------------------


def shard_slice(rows: int, w: World | None = None) -> slice:
    """This rank's contiguous rows of a global batch of ``rows`` (uneven shards; some may be empty)."""
    w = w or world()
    return slice(w.rank * rows // w.size, (w.rank + 1) * rows // w.size)


def shard(batch: torch.Tensor, w: World | None = None) -> torch.Tensor:
    """This rank's rows of ``batch`` ``[B, …]`` → ``[b, …]``."""
    return batch[shard_slice(len(batch), w)]


def require_rows(rows: int, what: str, w: World | None = None) -> None:
    """Stages that draw random numbers per row need every rank to hold at least one row."""
    w = w or world()
    if rows < w.size:
        raise UserError(f"{what}: a batch of {rows} rows cannot be split over {w.size} processes; "
                        f"use a batch of at least {w.size} or fewer processes")


# --- reductions -----------------------------------------------------------------


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise sums over ranks of ``tensors`` (same shapes on every rank), in one collective
    per dtype; returns new tensors (the inputs are left alone)."""
    import torch.distributed as dist

    if not world().distributed:
        return [t.detach().clone() for t in tensors]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i])
            offset += n
    return out  # type: ignore[return-value]


def all_reduce_scalars(values: Iterable[float]) -> list[float]:
    """Sums over ranks of Python numbers (in float64: exact for token counts below 2⁵³)."""
    values = list(values)
    if not world().distributed:
        return values
    return all_reduce_sum([torch.tensor(values, dtype=torch.float64)])[0].tolist()


def global_means(means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``Σ_ranks means·counts / Σ_ranks counts`` elementwise (means of a loss or statistic over each
    rank's tokens → over the global batch's), differentiable through this rank's ``means``.

    The value is the global mean on every rank; the gradient reaches this rank's means
    with weight ``count / Σ counts``, so the sum of the ranks' gradients
    (``all_reduce_grads``) of any function of these means is that function's gradient on
    the global batch. A rank holding every token gets weight exactly 1 (and the others
    add exact zeros): its arithmetic is the single process's, bit for bit.
    """
    counts = counts.detach().double()
    total = all_reduce_sum([counts])[0]
    local = means * (counts / total.clamp(min=1)).to(means.dtype)
    summed = all_reduce_sum([local.detach()])[0]
    return local + (summed - local.detach())


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over ranks, one flattened collective (``None`` counts as
    zeros: a rank whose shard was empty contributes nothing); every param gets a gradient."""
    if not world().distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, all_reduce_sum(grads), strict=True):
        p.grad = g.to(p.dtype)


def all_gather_cat(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each 1-D tensor in ``parts`` (lengths may differ per rank), the concatenation of every
    rank's tensor in rank order: with contiguous shards, the global batch's order."""
    import torch.distributed as dist

    w = world()
    if not w.distributed:
        return list(parts)
    dtype = parts[0].dtype if parts else torch.float32
    lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)
    all_lengths = [torch.zeros_like(lengths) for _ in range(w.size)]
    dist.all_gather(all_lengths, lengths)
    longest = max(int(n.sum()) for n in all_lengths)
    flat = torch.zeros(longest, dtype=dtype)
    if parts:
        mine = torch.cat([p.detach().reshape(-1).to(dtype) for p in parts])
        flat[: len(mine)] = mine
    gathered = [torch.zeros_like(flat) for _ in range(w.size)]
    dist.all_gather(gathered, flat)
    out: list[list[torch.Tensor]] = [[] for _ in parts]
    for rank_flat, rank_lengths in zip(gathered, all_lengths, strict=True):
        offset = 0
        for i, n in enumerate(rank_lengths.tolist()):
            out[i].append(rank_flat[offset : offset + n])
            offset += n
    return [torch.cat(pieces) for pieces in out]


def sum_unit_counters(routed) -> None:
    """Sum every routed and folded unit's executed/token counters over ranks (the statistics that
    sparsity, FLOPs and fold decisions read), in place."""
    if not world().distributed:
        return
    units = [*routed.units.values(), *routed.folded.values()]
    totals = all_reduce_scalars([v for u in units for v in (u.executed, u.tokens)])
    for i, u in enumerate(units):
        u.executed, u.tokens = int(totals[2 * i]), int(totals[2 * i + 1])


class _Ranks:
    """This process group's collectives as ``irc.eval.calibrate.Ranks``: calibration (in
    ``irc.eval``, which imports nothing from ``irc.train``) gathers through them."""

    @property
    def distributed(self) -> bool:
        return world().distributed

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return shard(batch)

    def all_gather_cat(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return all_gather_cat(parts)

    def sum_unit_counters(self, routed) -> None:
        sum_unit_counters(routed)


RANKS = _Ranks()


# --- rank 0 work and broadcasts ----------------------------------------------------


def broadcast_object(obj=None, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled over the process group: in-process data only)."""
    import torch.distributed as dist

    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s ``tensors`` into every rank's, in place (same shapes everywhere)."""
    import torch.distributed as dist

    if not world().distributed or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    dist.broadcast(flat, src=src)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
            offset += n


def on_main(fn: Callable[[], object]):
    """Run ``fn`` on rank 0 (file reads and writes), hand its result to every rank.

    A ``UserError`` on rank 0 is raised on every rank with the same message, so all
    processes stop together; any other exception is raised on rank 0 with its traceback
    and as a ``RuntimeError`` naming it on the others.
    """
    w = world()
    if not w.distributed:
        return fn()
    result, error = None, None
    if w.is_main:
        try:
            result = fn()
        except UserError as e:
            error = ("user", str(e))
            raised = e
        except BaseException as e:  # noqa: BLE001 - re-raised below after telling the others
            error = ("bug", f"{type(e).__name__}: {e}")
            raised = e
    result, error = broadcast_object((result, error) if w.is_main else None)
    if error is not None:
        if w.is_main:
            raise raised
        if error[0] == "user":
            raise UserError(error[1])
        raise RuntimeError(f"rank 0 failed: {error[1]}")
    return result


def barrier() -> None:
    import torch.distributed as dist

    if world().distributed:
        dist.barrier()


# --- random numbers ---------------------------------------------------------------


class ShardedGumbel:
    """``F.gumbel_softmax(logits, tau, hard=True)`` for this rank's rows of a global batch.

    The noise of the whole global batch ``[B, T, 2]`` is drawn (every rank's generator
    holds the same state, and draws as much as one process would), and rows
    ``[start, start + b)`` are kept: a token's noise, and the generator state after
    the step, do not depend on the number of processes. The rest is torch's own
    ``gumbel_softmax`` (straight-through hard gates).
    """

    def __init__(self, start: int, rows: int):
        self.start, self.rows = start, rows

    def __call__(self, logits: torch.Tensor, tau: float = 1.0, hard: bool = True, dim: int = -1) -> torch.Tensor:
        full = torch.empty((self.rows, *logits.shape[1:]), dtype=logits.dtype, device=logits.device)
        gumbels = -full.exponential_().log()[self.start : self.start + logits.shape[0]]  # [b, T, 2]
        y_soft = ((logits + gumbels) / tau).softmax(dim)
        if not hard:
            return y_soft
        index = y_soft.max(dim, keepdim=True)[1]
        y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
        return y_hard - y_soft.detach() + y_soft


@contextlib.contextmanager
def sharded_gumbel(routed, rows: int):
    """While active, the units' hard Gumbel gates draw the noise of a global batch of ``rows``
    rows and keep this rank's shard (nothing changes with one process)."""
    w = world()
    units = list(routed.units.values())
    if w.distributed:
        gumbel = ShardedGumbel(shard_slice(rows, w).start, rows)
        for u in units:
            u.gumbel = gumbel
    try:
        yield
    finally:
        if w.distributed:
            for u in units:
                u.gumbel = None


# --- the launcher -------------------------------------------------------------------


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m irc ARGV`` in ``nproc`` processes through torch's elastic launcher (what
    ``torchrun --standalone --nproc-per-node N -m irc ARGV`` does); returns an exit status.

    When a process fails the launcher stops the others; the failing rank has printed its
    own message (``error: …``) above the launcher's summary.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "irc", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {f.local_rank} (exit {f.exitcode})" for f in e.failures.values())
        raise UserError(f"the conversion failed on {failures}; see that process's message above") from None
    return 0
