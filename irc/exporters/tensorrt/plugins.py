"""TensorRT plugins ``irc::TokenGather`` and ``irc::TokenScatter`` (``tensorrt.plugin``).

TensorRT's ONNX parser turns a ``TokenGather`` / ``TokenScatter`` node carrying
``plugin_namespace="irc"`` and ``plugin_version="1"`` into these plugins. Each has:

- a shape/type description (``@trtp.register``) from ``shapes.py``, the same rules as
  the ops' ``register_fake``: gather ``[N, D], [K] -> [K, D]``; scatter's output is
  ``base`` itself (``aliased()``), ``[N, D]``, written in place;
- type/format combinations (``@trtp.autotune``): FP32, FP16 or BF16 rows, INT64 index,
  linear layout;
- an ahead-of-time implementation (``@trtp.aot_impl``): the ops' Triton kernels
  (``kernels.py``) compiled to PTX, launched by TensorRT with symbolic grid sizes, so a
  built engine runs without Python;
- a just-in-time implementation (``@trtp.impl``) that launches the same kernels from
  Python on TensorRT's stream, the fallback when an engine is built with
  ``prefer_aot=False``.

Both implementations are registered; the builder picks one per engine with the network
flag ``PREFER_AOT_PYTHON_PLUGINS`` / ``PREFER_JIT_PYTHON_PLUGINS``.
"""

from __future__ import annotations

from irc.exporters.tensorrt import _import_tensorrt
from irc.exporters.tensorrt.shapes import AUTOTUNE_GATHER, AUTOTUNE_SCATTER, gather_output_shape

__all__ = ["PLUGIN_IDS", "PLUGIN_VERSION", "register_plugins"]

NAMESPACE = "irc"
PLUGIN_VERSION = "1"
PLUGIN_IDS = (f"{NAMESPACE}::TokenGather", f"{NAMESPACE}::TokenScatter")
_registered = False


def register_plugins() -> None:
    """Register both plugins with TensorRT (idempotent). Raises ``UserError`` without TensorRT."""
    global _registered
    if _registered:
        return
    trt = _import_tensorrt()
    import tensorrt.plugin as trtp

    _register_gather(trt, trtp)
    _register_scatter(trt, trtp)
    _registered = True


def _triton_dtype(trt, dtype) -> str:
    from irc.exporters.tensorrt.kernels import TRITON_DTYPES

    names = {trt.float32: "FLOAT", trt.float16: "HALF", trt.bfloat16: "BF16"}
    if dtype not in names:
        raise TypeError(f"irc plugins take FP32, FP16 or BF16 token rows, got {dtype}")
    return TRITON_DTYPES[names[dtype]]


def _hidden_block(trtp, d_expr) -> int:
    """BLOCK_D is a compile-time constant: a whole row when D is a build-time constant <= 1024."""
    from irc.exporters.tensorrt.kernels import block_d_for

    try:
        return block_d_for(d_expr.constant_value() if d_expr.is_constant else None)
    except RuntimeError:  # a "fake" expression outside a shape context
        return block_d_for(None)


def _launch(trtp, kernel, k_expr, d_expr):
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.max(k_expr, 1)  # one idle program when K = 0; the kernel guards it
    params.grid_y = trtp.cdiv(d_expr, kernel.block_d)
    params.block_x = kernel.block_x
    params.shared_mem = kernel.shared_mem
    # int32 extras in the entry points' order: K, D, then row/column strides of the
    # first tensor read and of the output (TensorRT hands linear, contiguous tensors)
    extras = trtp.SymIntExprs.from_tuple(
        [trtp.SymInt32(e) for e in (k_expr, d_expr, d_expr, 1, d_expr, 1)])
    return kernel.name.encode(), kernel.ptx.encode(), params, extras


def _register_gather(trt, trtp) -> None:
    @trtp.register(PLUGIN_IDS[0])
    def _gather_desc(x: trtp.TensorDesc, index: trtp.TensorDesc) -> trtp.TensorDesc:
        return trtp.from_shape_expr(gather_output_shape(x.shape_expr, index.shape_expr), dtype=x.dtype)

    @trtp.autotune(PLUGIN_IDS[0])
    def _gather_autotune(x: trtp.TensorDesc, index: trtp.TensorDesc, outputs) -> list:
        return [trtp.AutoTuneCombination(AUTOTUNE_GATHER, "LINEAR")]

    @trtp.aot_impl(PLUGIN_IDS[0])
    def _gather_aot(x: trtp.TensorDesc, index: trtp.TensorDesc, outputs):
        from irc.exporters.tensorrt.kernels import compile_aot

        k_expr, d_expr = index.shape_expr[0], x.shape_expr[1]
        kernel = compile_aot("gather", _triton_dtype(trt, x.dtype), block_d=_hidden_block(trtp, d_expr))
        return _launch(trtp, kernel, k_expr, d_expr)

    @trtp.impl(PLUGIN_IDS[0])
    def _gather_jit(x: trtp.Tensor, index: trtp.Tensor, outputs, stream: int) -> None:
        import torch

        from irc.ops.token_gather import token_gather_triton

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = _as_torch(outputs[0])
            token_gather_triton(_as_torch(x), _as_torch(index), out=out)


def _register_scatter(trt, trtp) -> None:
    @trtp.register(PLUGIN_IDS[1])
    def _scatter_desc(base: trtp.TensorDesc, src: trtp.TensorDesc, index: trtp.TensorDesc) -> trtp.TensorDesc:
        from irc.exporters.tensorrt.shapes import scatter_output_shape

        scatter_output_shape(base.shape_expr, src.shape_expr, index.shape_expr)  # rank checks
        return base.aliased()  # [N, D]: base, with K rows overwritten in place

    @trtp.autotune(PLUGIN_IDS[1])
    def _scatter_autotune(base: trtp.TensorDesc, src: trtp.TensorDesc, index: trtp.TensorDesc, outputs) -> list:
        return [trtp.AutoTuneCombination(AUTOTUNE_SCATTER, "LINEAR")]

    @trtp.aot_impl(PLUGIN_IDS[1])
    def _scatter_aot(base: trtp.TensorDesc, src: trtp.TensorDesc, index: trtp.TensorDesc, outputs):
        from irc.exporters.tensorrt.kernels import compile_aot

        k_expr, d_expr = index.shape_expr[0], base.shape_expr[1]
        kernel = compile_aot("scatter", _triton_dtype(trt, base.dtype), block_d=_hidden_block(trtp, d_expr))
        return _launch(trtp, kernel, k_expr, d_expr)

    @trtp.impl(PLUGIN_IDS[1])
    def _scatter_jit(base: trtp.Tensor, src: trtp.Tensor, index: trtp.Tensor, outputs, stream: int) -> None:
        import torch

        from irc.exporters.tensorrt.kernels import launch_scatter_aot

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            # outputs[0] shares base's buffer (aliased): write the K selected rows into it
            launch_scatter_aot(_as_torch(outputs[0]), _as_torch(src), _as_torch(index))


class _CudaArray:
    """``__cuda_array_interface__`` over a raw pointer, for dtypes the protocol lacks (bf16)."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False),
                                         "version": 2, "strides": None}


def _as_torch(t):
    """A zero-copy torch view of a ``tensorrt.plugin.Tensor`` (bf16 through an int16 view)."""
    import tensorrt as trt
    import torch

    if t.dtype == trt.bfloat16:
        raw = torch.as_tensor(_CudaArray(t.data_ptr, tuple(t.shape), "<i2"), device="cuda")
        return raw.view(torch.bfloat16)
    return torch.as_tensor(t, device="cuda")
