"""Which bf16 matrix kernel a decode step's few rows take on the CPU: oneDNN or ATen's own.

A decode step multiplies a row or two (batch 1: one token) by every weight matrix of
the model. In bf16 on the CPU, ``F.linear`` goes through oneDNN, whose per-call setup
outweighs such a product: the 210 matrices of SmolLM2-135M's layers, one pass (the weights
stream from memory, as in a step), 2 cores (AMD EPYC, AVX-512 with bf16), median of 9:

    rows         1       2       3       4       8
    oneDNN    21.2 ms 20.1 ms 24.3 ms 31.1 ms 28.9 ms
    ATen       9.6 ms 12.7 ms 27.5 ms 28.8 ms 52.8 ms

``irc.nn.small_linear`` already takes the routers' and forecasters' one-row products
out of oneDNN, one call at a time; ``Decoder.step`` does it for a whole step of few
rows (``for_rows``), for the dense and the routed graph alike, so a comparison of the
two stays like for like.

Which kernel wins depends on the CPU (oneDNN's AMX kernels, say) and on the shapes,
so it is measured, once per process and set of weight shapes, on the base model's
weights when a decoder is built (``aten_rows``, about half a second; a routed decoder
and its dense baseline share the result): the largest row count up to which ATen's
kernel beat oneDNN by ``MARGIN`` at every count, 0 where it never did. A count where
the two are close (three rows on the CPU above) can fall either way between processes.
``IRC_DECODE_GEMM`` overrides the measurement: ``onednn`` (always oneDNN), ``aten``
(ATen's kernel up to ``MAX_ROWS`` rows), ``auto`` (the default).

Results: the same products, accumulated in fp32 and rounded once to bf16, in another
order of accumulation, so an output may differ in its last bit (a 1-ulp change in
about one matrix output in five, SmolLM2's weights). fp32 takes BLAS whether oneDNN
is on or not: nothing here changes fp32 results, and fp32 weights are never measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from irc.errors import UserError

ENV = "IRC_DECODE_GEMM"
MAX_ROWS = 4  # the most rows measured (and taken by "aten"); beyond it oneDNN's blocking wins everywhere seen
MARGIN = 0.9  # ATen's pass must take at most this fraction of oneDNN's to be chosen
REPEATS = 3  # interleaved passes per kernel and row count; the fastest counts

_MEASURED: dict[tuple, int] = {}


def aten_rows(weights: Iterable[torch.Tensor]) -> int:
    """Steps of at most this many rows take ATen's kernel (0: oneDNN always), for these weights."""
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting not in ("auto", "onednn", "aten"):
        raise UserError(f"{ENV}={setting!r}: expected auto, onednn or aten")
    mats = _distinct(weights)
    if not mats or setting == "onednn" or not torch.backends.mkldnn.is_available():
        return 0
    if setting == "aten":
        return MAX_ROWS
    key = (mats[0].dtype, tuple(sorted(tuple(w.shape) for w in mats)))
    if key not in _MEASURED:
        _MEASURED[key] = choose(measure(mats))
    return _MEASURED[key]


def choose(timings: dict[int, tuple[float, float]]) -> int:
    """The largest r such that ATen's time is at most ``MARGIN`` × oneDNN's at every row count ≤ r.

    ``timings``: rows → (oneDNN seconds, ATen seconds)."""
    limit = 0
    for rows in sorted(timings):
        onednn, aten = timings[rows]
        if aten > MARGIN * onednn:
            break
        limit = rows
    return limit


def measure(mats: list[torch.Tensor], rows: Iterable[int] = range(1, MAX_ROWS + 1)) -> dict[int, tuple[float, float]]:
    """Seconds for one pass of ``F.linear`` over ``mats`` per row count: (oneDNN, ATen), best of REPEATS."""
    out = {}
    with torch.no_grad():
        for r in rows:
            xs = {w.shape[1]: torch.ones(r, w.shape[1], dtype=w.dtype, device=w.device) for w in mats}
            best = [float("inf"), float("inf")]
            _pass(mats, xs, aten=False)  # warm-up: first-call setup of either kernel
            _pass(mats, xs, aten=True)
            for _ in range(REPEATS):
                for i, aten in enumerate((False, True)):
                    best[i] = min(best[i], _pass(mats, xs, aten))
            out[r] = (best[0], best[1])
    return out


@contextmanager
def for_rows(rows: int, limit: int) -> Iterator[None]:
    """oneDNN off around a step of ``rows`` rows when ``rows <= limit`` (and it was on); restored after."""
    if rows > limit or not torch._C._get_mkldnn_enabled():
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


def _distinct(weights: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The bf16 CPU matrices among ``weights``, each storage once."""
    seen, out = set(), []
    for w in weights:
        if w.dim() != 2 or w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.data_ptr() in seen:
            continue
        seen.add(w.data_ptr())
        out.append(w.detach())
    return out


def _pass(mats, xs, aten: bool) -> float:
    with for_rows(1, int(aten)):  # limit 1: ATen's kernel; 0: oneDNN
        start = time.perf_counter()
        for w in mats:
            F.linear(xs[w.shape[1]], w)
        return time.perf_counter() - start
