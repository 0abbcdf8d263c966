"""``irc::token_scatter``: write K routed token rows back into the full [N, D] stream.

``token_scatter(base, src, index)`` returns a new tensor equal to ``base`` with row
``index[k]`` replaced by ``src[k]``. It is functional: ``base`` is never mutated, so the
op stays a single, side-effect-free node through ``torch.export``. It is the inverse of
``irc::token_gather`` on the selected rows: a routed block gathers the tokens it computes,
runs on them, and scatters the results back over the tokens that skipped it.

Indices must be unique and in ``[0, N)``. Neither is checked (that would need a
device-to-host sync): with duplicates the row written last is unspecified, and an index
out of range is an error on the CPU and undefined behaviour in the Triton kernel.

Shape legend: N tokens (the batch flattened, ``[B, T, D] -> [B*T, D]``), K selected
tokens, D hidden.

One file holds the op: definition, fake (shape) implementation, autograd, the pure-torch
reference that runs on the CPU, and the Triton kernel that runs on CUDA when triton is
installed (CUDA without triton falls back to the reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # triton is optional: without it CUDA tensors take the reference path.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["token_scatter", "token_scatter_reference", "token_scatter_triton"]

# Widest column block one program copies; a row of D <= 1024 is one program.
_MAX_BLOCK_D = 1024


def _check_inputs(base: Tensor, src: Tensor, index: Tensor) -> None:
    """Raise ``ValueError`` naming the bad argument; reads metadata only (no sync)."""
    if base.dim() != 2:
        raise ValueError(
            f"token_scatter: base must be 2-D [N, D] with tokens flattened over the batch, "
            f"got shape {tuple(base.shape)}; reshape [B, T, D] to [B*T, D] first"
        )
    if src.dim() != 2:
        raise ValueError(f"token_scatter: src must be 2-D [K, D], got shape {tuple(src.shape)}")
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(
            f"token_scatter: index must be a 1-D int64 tensor [K], got {index.dim()}-D "
            f"{index.dtype}; use index.reshape(-1).long()"
        )
    if src.shape[0] != index.shape[0]:
        raise ValueError(
            f"token_scatter: src has {src.shape[0]} rows but index has {index.shape[0]} "
            f"entries; they must match (one source row per index)"
        )
    if src.shape[1] != base.shape[1]:
        raise ValueError(
            f"token_scatter: src hidden size {src.shape[1]} does not match base hidden size "
            f"{base.shape[1]}"
        )
    if src.dtype != base.dtype:
        raise ValueError(
            f"token_scatter: src dtype {src.dtype} does not match base dtype {base.dtype}; "
            f"cast with src.to(base.dtype)"
        )
    if src.device != base.device or index.device != base.device:
        raise ValueError(
            f"token_scatter: base, src and index must be on one device, got {base.device}, "
            f"{src.device} and {index.device}"
        )


def token_scatter_reference(base: Tensor, src: Tensor, index: Tensor) -> Tensor:
    """Pure-torch ``token_scatter``: the CPU implementation and the tests' oracle."""
    out = base.clone(memory_format=torch.contiguous_format)  # [N, D]
    out[index] = src
    return out


if triton is not None:

    @triton.jit
    def _token_scatter_kernel(
        src_ptr,
        index_ptr,
        out_ptr,
        D,
        stride_src_k,
        stride_src_d,
        stride_out_n,
        stride_out_d,
        BLOCK_D: tl.constexpr,
    ):
        # One program copies columns [pid_d * BLOCK_D, +BLOCK_D) of src row k to out row index[k].
        k = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        row = tl.load(index_ptr + k)  # int64: N * D may exceed 2**31
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        vals = tl.load(src_ptr + k * stride_src_k + cols * stride_src_d, mask=mask)
        tl.store(out_ptr + row * stride_out_n + cols * stride_out_d, vals, mask=mask)


def token_scatter_triton(base: Tensor, src: Tensor, index: Tensor) -> Tensor:
    """Run the Triton kernel on whatever device the tensors are on.

    On CUDA this is what the op dispatches to. On the CPU it works under
    ``TRITON_INTERPRET=1`` (set before triton is imported), which is how the tests check
    the kernel without a GPU.
    """
    if triton is None:
        raise RuntimeError("token_scatter_triton needs triton: pip install 'triton>=3.2'")
    _check_inputs(base, src, index)
    out = base.clone(memory_format=torch.contiguous_format)  # [N, D]
    k, d = src.shape
    if k == 0 or d == 0:
        return out
    index = index.contiguous()  # [K]
    block_d = min(triton.next_power_of_2(d), _MAX_BLOCK_D)
    grid = (k, triton.cdiv(d, block_d))
    _token_scatter_kernel[grid](
        src,
        index,
        out,
        d,
        src.stride(0),
        src.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_D=block_d,
    )
    return out


@torch.library.custom_op("irc::token_scatter", mutates_args=())
def _token_scatter_op(base: Tensor, src: Tensor, index: Tensor) -> Tensor:
    _check_inputs(base, src, index)
    if base.is_cuda and triton is not None:
        return token_scatter_triton(base, src, index)
    return token_scatter_reference(base, src, index)


@_token_scatter_op.register_fake
def _(base: Tensor, src: Tensor, index: Tensor) -> Tensor:
    _check_inputs(base, src, index)
    return base.new_empty(base.shape)  # [N, D], contiguous like the real outputs


def _setup_context(ctx, inputs, output) -> None:
    _, _, index = inputs
    ctx.save_for_backward(index)


def _backward(ctx, grad: Tensor):
    # grad [N, D]. Rows at index were overwritten, so base gets no gradient there and src
    # gets exactly those rows. Written with the ops themselves (irc.ops registers both),
    # so the backward graph is single nodes too and double backward works.
    (index,) = ctx.saved_tensors
    grad_base = grad_src = None
    if ctx.needs_input_grad[0]:
        zeros = grad.new_zeros(index.shape[0], grad.shape[1])  # [K, D]
        grad_base = torch.ops.irc.token_scatter(grad, zeros, index)  # [N, D]
    if ctx.needs_input_grad[1]:
        grad_src = torch.ops.irc.token_gather(grad, index)  # [K, D]
    return grad_base, grad_src, None


_token_scatter_op.register_autograd(_backward, setup_context=_setup_context)


def token_scatter(base: Tensor, src: Tensor, index: Tensor) -> Tensor:
    """Return a copy of ``base`` [N, D] with row ``index[k]`` replaced by ``src[k]`` [K, D].

    ``index`` is 1-D int64 [K] with unique entries in ``[0, N)``; ``base`` is not mutated.
    Differentiable in ``base`` and ``src``. Calls ``torch.ops.irc.token_scatter``.
    """
    return torch.ops.irc.token_scatter(base, src, index)


def token_scatter_onnx_portable(base, src, index):
    """ONNX lowering with standard ops only (``portable`` profile): ``ScatterND`` of rows."""
    from onnxscript import opset18 as op

    return op.ScatterND(base, op.Unsqueeze(index, op.Constant(value_ints=[1])), src)


def token_scatter_onnx_trt(base, src, index):
    """ONNX lowering for the ``trt`` profile: one ``TokenScatter`` plugin node (``irc.ops.onnx_plugin``)."""
    from irc.ops.onnx_plugin import plugin_attributes, plugin_opset

    contrib = plugin_opset("TokenScatter", [("base", "T"), ("src", "T"), ("index", "tensor(int64)")],
                           [("out", "T")],
                           doc="out = base with row index[k] replaced by src[k]: base [N, D], src [K, D], "
                           "index [K] int64 -> out [N, D]")
    return contrib.TokenScatter(base, src, index, **plugin_attributes())
