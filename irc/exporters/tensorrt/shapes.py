"""Shape rules of the TensorRT plugins, as plain functions.

They mirror the ``register_fake`` implementations of ``irc::token_gather`` and
``irc::token_scatter`` (``irc/ops``), and work on anything indexable whose elements
support ``+`` and ``*``: Python ints in the tests, ``tensorrt.plugin.ShapeExpr`` in the
plugins' shape callbacks. So one rule serves both, and the tests check it against the
ops' fake tensors without TensorRT.

Shape legend: N tokens (batch flattened, N = B·T), K selected tokens, D hidden.

Where K comes from:
- ``capacity`` routing: K = B · ceil(c·T), a shape expression of the inputs;
- ``threshold`` routing: K = the length of ``NonZero(mask)``, data-dependent, with the
  upper bound N = B·T. TensorRT's NonZero layer declares that size; the plugins only
  propagate ``index``'s length, so they need no size tensor of their own.
"""

from __future__ import annotations

import math

__all__ = [
    "AUTOTUNE_GATHER", "AUTOTUNE_SCATTER", "PLUGIN_DTYPES", "capacity_tokens", "gather_output_shape",
    "scatter_output_shape", "threshold_tokens_bound",
]

# TensorRT type names of the token rows the plugins accept; the index is always INT64.
PLUGIN_DTYPES = ("FP32", "FP16", "BF16")
_FLOATS = "|".join(PLUGIN_DTYPES)
# tensorrt.plugin.AutoTuneCombination strings, one position per input then output: the
# i-th option of every "|" list goes together (all FP32, all FP16 or all BF16).
AUTOTUNE_GATHER = f"{_FLOATS}, INT64, {_FLOATS}"
AUTOTUNE_SCATTER = f"{_FLOATS}, {_FLOATS}, INT64, {_FLOATS}"


def _check_rank(name: str, shape, rank: int) -> None:
    try:
        n = len(shape)
    except TypeError:  # a shape object without len(): nothing to check
        return
    if n != rank:
        raise ValueError(f"{name} must be {rank}-D, got {len(shape)}-D")


def gather_output_shape(x_shape, index_shape) -> tuple:
    """``token_gather(x [N, D], index [K]) -> [K, D]``."""
    _check_rank("token_gather: x", x_shape, 2)
    _check_rank("token_gather: index", index_shape, 1)
    return (index_shape[0], x_shape[1])


def scatter_output_shape(base_shape, src_shape, index_shape) -> tuple:
    """``token_scatter(base [N, D], src [K, D], index [K]) -> [N, D]``.

    Only ranks are checked: ``src``'s K and D equal ``index``'s K and ``base``'s D by the
    op's contract, which symbolic TensorRT expressions cannot compare at build time.
    """
    _check_rank("token_scatter: base", base_shape, 2)
    _check_rank("token_scatter: src", src_shape, 2)
    _check_rank("token_scatter: index", index_shape, 1)
    return (base_shape[0], base_shape[1])


def capacity_tokens(batch: int, seq: int, capacity: float) -> int:
    """K in ``capacity`` routing: k = ceil(c·T) tokens in each of the B rows."""
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must be in (0, 1], got {capacity}")
    return batch * min(seq, math.ceil(capacity * seq))


def threshold_tokens_bound(batch: int, seq: int) -> int:
    """Upper bound of K in ``threshold`` routing: every token executes."""
    return batch * seq
