"""``irc::token_gather``: pick the K routed token rows out of the full [N, D] stream.

``token_gather(x, index)`` returns ``out`` [K, D] with ``out[k] = x[index[k]]``. The
caller flattens the batch first (``[B, T, D] -> [B*T, D]``), so one index addresses
tokens of every sequence. K may be 0 (a block no token is routed to) and comes from the
index's length, so the output shape needs no data-dependent size of its own: with
``index = torch.nonzero(mask).squeeze(-1)`` the op stays one node through
``torch.export``.

Indices must be in ``[0, N)`` (not checked: that would need a device-to-host sync; out
of range is an error on the CPU and undefined behaviour in the Triton kernel). The
forward accepts repeated indices, but the gradient scatters rather than accumulates, so
it is correct only for unique ones, which is what a routing selection is.

Shape legend: N tokens (the batch flattened), K selected tokens, D hidden.

One file holds the op: definition, fake (shape) implementation, autograd, the pure-torch
reference that runs on the CPU, and the Triton kernel that runs on CUDA when triton is
installed (CUDA without triton falls back to the reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

from irc.ops.token_scatter import token_scatter

try:  # triton is optional: without it CUDA tensors take the reference path.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["token_gather", "token_gather_reference", "token_gather_triton"]

# Widest column block one program copies; a row of D <= 1024 is one program.
_MAX_BLOCK_D = 1024


def _check_inputs(x: Tensor, index: Tensor) -> None:
    """Raise ``ValueError`` naming the bad argument; reads metadata only (no sync)."""
    if x.dim() != 2:
        raise ValueError(
            f"token_gather: x must be 2-D [N, D] with tokens flattened over the batch, "
            f"got shape {tuple(x.shape)}; reshape [B, T, D] to [B*T, D] first"
        )
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(
            f"token_gather: index must be a 1-D int64 tensor [K], got {index.dim()}-D "
            f"{index.dtype}; use index.reshape(-1).long()"
        )
    if index.device != x.device:
        raise ValueError(
            f"token_gather: x and index must be on one device, got {x.device} and {index.device}"
        )


def token_gather_reference(x: Tensor, index: Tensor) -> Tensor:
    """Pure-torch ``token_gather``: the CPU implementation and the tests' oracle."""
    return x[index]  # [K, D], a new contiguous tensor


if triton is not None:

    @triton.jit
    def _token_gather_kernel(
        x_ptr,
        index_ptr,
        out_ptr,
        D,
        stride_x_n,
        stride_x_d,
        stride_out_k,
        stride_out_d,
        BLOCK_D: tl.constexpr,
    ):
        # One program copies columns [pid_d * BLOCK_D, +BLOCK_D) of x row index[k] to out row k.
        k = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        row = tl.load(index_ptr + k)  # int64: N * D may exceed 2**31
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        vals = tl.load(x_ptr + row * stride_x_n + cols * stride_x_d, mask=mask)
        tl.store(out_ptr + k * stride_out_k + cols * stride_out_d, vals, mask=mask)


def token_gather_triton(x: Tensor, index: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Run the Triton kernel on whatever device the tensors are on.

    On CUDA this is what the op dispatches to. On the CPU it works under
    ``TRITON_INTERPRET=1`` (set before triton is imported), which is how the tests check
    the kernel without a GPU. ``out`` [K, D] lets a test hand in a poisoned buffer to
    prove every element is written.
    """
    if triton is None:
        raise RuntimeError("token_gather_triton needs triton: pip install 'triton>=3.2'")
    _check_inputs(x, index)
    k, d = index.shape[0], x.shape[1]
    if out is None:
        out = x.new_empty(k, d)  # [K, D]
    elif out.shape != (k, d) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"token_gather_triton: out must be {x.dtype} [{k}, {d}] on {x.device}, got "
            f"{out.dtype} {list(out.shape)} on {out.device}"
        )
    if k == 0 or d == 0:
        return out
    index = index.contiguous()  # [K]
    block_d = min(triton.next_power_of_2(d), _MAX_BLOCK_D)
    grid = (k, triton.cdiv(d, block_d))
    _token_gather_kernel[grid](
        x,
        index,
        out,
        d,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_D=block_d,
    )
    return out


@torch.library.custom_op("irc::token_gather", mutates_args=())
def _token_gather_op(x: Tensor, index: Tensor) -> Tensor:
    _check_inputs(x, index)
    if x.is_cuda and triton is not None:
        return token_gather_triton(x, index)
    return token_gather_reference(x, index)


@_token_gather_op.register_fake
def _(x: Tensor, index: Tensor) -> Tensor:
    _check_inputs(x, index)
    return x.new_empty(index.shape[0], x.shape[1])  # [K, D]


def _setup_context(ctx, inputs, output) -> None:
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.num_tokens = x.shape[0]


def _backward(ctx, grad: Tensor):
    # grad [K, D] lands back on the rows it came from; every other row of x gets zero.
    # Written with the op itself, so the backward graph is one node and is differentiable.
    (index,) = ctx.saved_tensors
    zeros = grad.new_zeros(ctx.num_tokens, grad.shape[1])  # [N, D]
    return token_scatter(zeros, grad, index), None


_token_gather_op.register_autograd(_backward, setup_context=_setup_context)


def token_gather(x: Tensor, index: Tensor) -> Tensor:
    """Return ``x[index]``: rows ``index`` [K] (1-D int64, in ``[0, N)``) of ``x`` [N, D].

    Differentiable in ``x`` (for unique indices). Calls ``torch.ops.irc.token_gather``.
    """
    return torch.ops.irc.token_gather(x, index)


def token_gather_onnx_portable(x, index):
    """ONNX lowering with standard ops only (``portable`` profile): ``Gather(x, index, axis=0)``."""
    from onnxscript import opset18 as op

    return op.Gather(x, index, axis=0)


def token_gather_onnx_trt(x, index):
    """ONNX lowering for the ``trt`` profile: one ``TokenGather`` plugin node (``irc.ops.onnx_plugin``)."""
    from irc.ops.onnx_plugin import plugin_attributes, plugin_opset

    contrib = plugin_opset("TokenGather", [("x", "T"), ("index", "tensor(int64)")], [("out", "T")],
                           doc="out[k] = x[index[k]]: x [N, D], index [K] int64 -> out [K, D]")
    return contrib.TokenGather(x, index, **plugin_attributes())
