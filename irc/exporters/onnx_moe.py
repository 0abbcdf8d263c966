"""ONNX lowering of transformers' grouped expert product (mixture-of-experts MLPs).

transformers runs an MoE block's experts (Mixtral, Qwen3-MoE) on CPU through the
custom op ``transformers::grouped_mm_fallback(x [S, Din], w [E, Din, Dout], offs [E])``:
the rows of ``x`` are sorted by expert, ``offs`` holds the cumulative row counts,
and expert ``e`` multiplies rows ``offs[e-1]:offs[e]`` by ``w[e]``. The op has no
ONNX function. This lowering is the same loop, unrolled over the E experts (E is
static, from the weight's shape): one ``Slice`` of the rows, one ``MatMul`` by
that expert's matrix, and a ``Concat`` of the E results in row order. It computes
exactly what the op does (each row by its own expert only) without gathering a
weight matrix per row.
"""

from __future__ import annotations


def grouped_mm_onnx(x, weight, offs):
    from onnxscript import opset18 as op

    experts = weight.shape[0]
    if not isinstance(experts, int):
        raise NotImplementedError("grouped_mm: the number of experts must be static")
    zero = op.Constant(value_ints=[0])
    axis = op.Constant(value_ints=[0])
    ends = op.Cast(offs, to=7)  # int64 [E]
    parts = []
    start = zero
    for e in range(experts):
        index = op.Constant(value_ints=[e])
        end = op.Gather(ends, index, axis=0)  # [1]
        rows = op.Slice(x, start, end, axis)  # [n_e, Din]
        w = op.Squeeze(op.Gather(weight, index, axis=0), axis)  # [Din, Dout]
        parts.append(op.MatMul(rows, w))
        start = end
    return op.Concat(*parts, axis=0)
