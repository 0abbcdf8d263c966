"""The ``irc::token_*`` Triton kernels in the argument order of a TensorRT AOT plugin launch.

A ``tensorrt.plugin.aot_impl`` returns compiled code that TensorRT launches with the
arguments ``(inputs..., extra int32 scalars..., outputs...)``. The ops' kernels
(``_token_gather_kernel``, ``_token_scatter_kernel`` in ``irc/ops``) take their output
pointer before the scalars, so each gets a thin ``@triton.jit`` entry point here that
reorders the arguments and calls the op's kernel, which Triton inlines: the copy loop
is the op's own code, not a second implementation.

The entry points add one guard: TensorRT launches ``max(K, 1)`` programs along the
first grid axis (a CUDA grid cannot be empty) and the extra program of an empty
selection (K = 0) must not read ``index[0]``.

``TokenScatter``'s plugin output is *aliased* to its ``base`` input (TensorRT's
``TensorDesc.aliased()``): the kernel overwrites the K selected rows in place and the
other rows already hold ``base``. So the AOT scatter is one launch of the op's kernel.

Shape legend: N tokens, K selected tokens, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from irc.ops.token_gather import _MAX_BLOCK_D, _token_gather_kernel
from irc.ops.token_scatter import _token_scatter_kernel

__all__ = ["AotKernel", "block_d_for", "compile_aot", "launch_gather_aot", "launch_scatter_aot"]

# TensorRT data-type names (str(trt.DataType.X) minus the prefix) -> Triton pointer types
TRITON_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
# the int32 extras both entry points take after their tensor inputs
_EXTRAS = ("K", "D", "stride_a_row", "stride_a_col", "stride_b_row", "stride_b_col")


@triton.jit
def _token_gather_aot(x_ptr, index_ptr, K, D, stride_x_n, stride_x_d, stride_out_k, stride_out_d, out_ptr,
                      BLOCK_D: tl.constexpr):
    if tl.program_id(0) < K:
        _token_gather_kernel(x_ptr, index_ptr, out_ptr, D, stride_x_n, stride_x_d, stride_out_k,
                             stride_out_d, BLOCK_D)


@triton.jit
def _token_scatter_aot(base_ptr, src_ptr, index_ptr, K, D, stride_src_k, stride_src_d, stride_out_n,
                       stride_out_d, out_ptr, BLOCK_D: tl.constexpr):
    # out_ptr == base_ptr: the plugin output is aliased to base, unselected rows are already there
    if tl.program_id(0) < K:
        _token_scatter_kernel(src_ptr, index_ptr, out_ptr, D, stride_src_k, stride_src_d, stride_out_n,
                              stride_out_d, BLOCK_D)


_ENTRY = {"gather": (_token_gather_aot, ("x_ptr", "index_ptr")),
          "scatter": (_token_scatter_aot, ("base_ptr", "src_ptr", "index_ptr"))}
_SCALARS = {"gather": ("K", "D", "stride_x_n", "stride_x_d", "stride_out_k", "stride_out_d"),
            "scatter": ("K", "D", "stride_src_k", "stride_src_d", "stride_out_n", "stride_out_d")}


@dataclass(frozen=True)
class AotKernel:
    name: str  # the kernel's symbol in the PTX
    ptx: str
    block_x: int  # threads per program: num_warps * 32
    shared_mem: int
    block_d: int

    def __post_init__(self):
        if not self.ptx or self.block_x <= 0:
            raise ValueError(f"empty compiled kernel {self.name!r}")


def block_d_for(d: int | None) -> int:
    """The column block: a whole row when D <= 1024 (as the ops' launchers choose), else 1024."""
    return _MAX_BLOCK_D if d is None else min(triton.next_power_of_2(max(d, 1)), _MAX_BLOCK_D)


def compile_aot(op: str, dtype: str, *, block_d: int, target=None) -> AotKernel:
    """Compile the ``op`` ("gather" | "scatter") entry point to PTX for Triton dtype ``dtype``.

    ``target`` is a ``triton.backends.compiler.GPUTarget``; ``None`` compiles for the
    active GPU. With an explicit target this runs without a GPU (the tests use it).
    ``triton.compile`` always runs its last stage too: the ptxas bundled in the triton
    wheel assembles a cubin (unused: TensorRT takes the PTX), and that ptxas's version
    sets the PTX ISA version.
    """
    if op not in _ENTRY:
        raise ValueError(f"op must be 'gather' or 'scatter', got {op!r}")
    if dtype not in TRITON_DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(TRITON_DTYPES.values())}, got {dtype!r}")
    fn, pointers = _ENTRY[op]
    signature = {p: ("*i64" if p == "index_ptr" else f"*{dtype}") for p in pointers}
    signature.update({s: "i32" for s in _SCALARS[op]})
    signature.update({"out_ptr": f"*{dtype}", "BLOCK_D": "constexpr"})
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs={"BLOCK_D": block_d})
    # fp fusion stated rather than defaulted (Triton 3.9 warns, 3.10 flips the default): these kernels
    # only move data, and True keeps the PTX Triton produced so far
    compiled = triton.compile(source, target=target, options={"enable_fp_fusion": True})
    return AotKernel(name=compiled.metadata.name, ptx=compiled.asm["ptx"],
                     block_x=compiled.metadata.num_warps * 32, shared_mem=compiled.metadata.shared,
                     block_d=block_d)


def launch_gather_aot(x, index, out):
    """Launch the gather entry point the way TensorRT does (grid max(K, 1)); for tests."""
    k, d = index.shape[0], x.shape[1]
    block_d, index = block_d_for(d), index.contiguous()  # [K]: the kernels read it densely
    _token_gather_aot[(max(k, 1), triton.cdiv(d, block_d))](
        x, index, k, d, x.stride(0), x.stride(1), out.stride(0), out.stride(1), out, BLOCK_D=block_d)
    return out


def launch_scatter_aot(base_out, src, index):
    """Launch the scatter entry point into ``base_out`` in place (the aliased output); for tests."""
    k, d = index.shape[0], src.shape[1]
    block_d, index = block_d_for(d), index.contiguous()  # [K]
    _token_scatter_aot[(max(k, 1), triton.cdiv(d, block_d))](
        base_out, src, index, k, d, src.stride(0), src.stride(1), base_out.stride(0), base_out.stride(1),
        base_out, BLOCK_D=block_d)
    return base_out
