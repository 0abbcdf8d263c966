"""One token's threshold decision in plain Python, bit-exact with ``RoutedUnit._decide``.

``_decide`` computes, in tensors::

    margin = (logits[..., 0] - logits[..., 1]).float() - threshold     # the subtraction in the logits' dtype
    execute = margin >= 0

A batch-1 decode step decides one token per unit, where tensor ops or numpy scalars cost
more than the arithmetic (12 µs per unit in a real SmolLM2 step on a 2-core CPU for the
numpy version this replaced, which also subtracted bf16 logits in fp32 and so decided
differently from ``_decide`` where θ fell within a bf16 rounding of the margin).
``executes`` gives ``_decide``'s bool from the two logits as Python floats (one ``tolist``):

- the difference rounded as the logits' dtype rounds it: on the CPU, ATen subtracts bf16
  and fp16 values in fp32 and rounds the result to the narrow type, so
  ``d = narrow(fp32(e − a))``; fp32 logits give ``d = fp32(e − a)``;
- then ``fp32(d − θ) ≥ 0`` holds exactly when ``d ≥ θ``: d and θ are fp32 values, rounding
  is monotone, and the fp32 difference of two distinct fp32 values is never 0 (gradual
  underflow), so the comparison needs no rounding at all.

The difference ``e − a`` is computed in float64, exact whenever the two logits are within
2^29 of each other; otherwise (never seen for router logits) numpy's fp32 subtraction is used.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")
_F16 = struct.Struct("<e")


def executes(exec_logit: float, approx_logit: float, theta: float, dtype: torch.dtype) -> bool:
    """``(exec − approx) − θ ≥ 0`` with ``_decide``'s roundings; the logits are values of ``dtype``,
    ``theta`` the threshold's fp32 value."""
    d = difference(exec_logit, approx_logit, dtype)
    if d == theta and math.isinf(d):  # inf − inf is NaN: not ≥ 0
        return False
    return d >= theta


def difference(e: float, a: float, dtype: torch.dtype) -> float:
    """``e − a`` as a tensor subtraction in ``dtype`` rounds it on the CPU, as a Python float."""
    d = e - a
    bp = d - e  # TwoSum (Knuth): the float64 rounding error of e + (−a) is exactly err
    err = (e - (d - bp)) + (-a - bp)
    if err != 0:  # float64 lost bits: take fp32's own op
        d32 = float(np.float32(e) - np.float32(a))
    else:
        d32 = _F32.unpack(_F32.pack(d))[0]  # one rounding to fp32 (nearest even), as ATen's fp32 result
    if dtype == torch.float32:
        return d32
    if dtype == torch.bfloat16:
        return _round_bf16(d32)
    if dtype == torch.float16:
        try:
            return _F16.unpack(_F16.pack(d32))[0]
        except OverflowError:  # beyond fp16's range: ATen rounds to ±inf
            return math.copysign(math.inf, d32)
    return float((torch.tensor(e, dtype=dtype) - torch.tensor(a, dtype=dtype)).float())


def _round_bf16(x32: float) -> float:
    """fp32 → bf16, round to nearest even (c10::BFloat16's rounding), as a Python float."""
    if x32 != x32:  # NaN stays NaN
        return x32
    bits = _U32.unpack(_F32.pack(x32))[0]
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return _F32.unpack(_U32.pack(bits))[0]
