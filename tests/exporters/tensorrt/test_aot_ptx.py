"""The plugins' AOT implementations compile to PTX for sm_80 and sm_90 and return matching launches.

``@trtp.aot_impl`` (``irc/exporters/tensorrt/plugins.py``) returns ``(kernel name, PTX,
KernelLaunchParams, int32 extras)``; TensorRT loads the PTX and launches the kernel with
those parameters, with no Python left. Here the AOT implementations run against a small
stand-in for ``tensorrt`` / ``tensorrt.plugin`` (TensorRT cannot be installed here) whose
shape expressions are plain integers, and ``compile_aot`` is pointed at an explicit
``GPUTarget``: Triton compiles for a target without a GPU (LLVM -> PTX, then the ptxas
bundled in the triton wheel assembles a cubin, which TensorRT does not use).

Checked against what was compiled: the PTX's ``.target`` and ``.entry``; ``block_x`` equals
the ``.reqntid`` the PTX demands (``num_warps * 32``); ``shared_mem`` is the kernel's
shared memory; ``grid_y`` covers D with the ``BLOCK_D`` the kernel was compiled with; the
int32 extras are as many as the PTX's ``.u32`` parameters, in the entry point's order.

Shape legend: N tokens, K selected tokens, D hidden.
"""

import importlib.util
import math
import re
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton: pip install 'triton>=3.2' (the dev extra)")

TARGETS = {"sm_80": 80, "sm_90": 90}  # A100; H100/H200


def _target(capability: int):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton has no NVIDIA compiler backend here: {e}")
    return GPUTarget("cuda", capability, 32)


class _Expr(int):
    """A ``tensorrt.plugin`` shape expression stand-in: its value, and whether it is a build-time constant."""

    def __new__(cls, value: int, constant: bool):
        expr = super().__new__(cls, value)
        expr.is_constant = constant
        return expr

    def constant_value(self) -> int:
        if not self.is_constant:
            raise RuntimeError("not a build-time constant")
        return int(self)


class _LaunchParams:
    def __init__(self):
        self.grid_x = self.grid_y = self.grid_z = 1
        self.block_x = self.block_y = self.block_z = 1
        self.shared_mem = 0


class _FakeTrtp:
    """What ``plugins._register_*`` use of ``tensorrt.plugin``; records the AOT implementations."""

    KernelLaunchParams = _LaunchParams
    SymIntExprs = SimpleNamespace(from_tuple=tuple)

    def __init__(self):
        self.aot = {}

    def register(self, plugin_id):
        return lambda fn: fn

    autotune = impl = register

    def aot_impl(self, plugin_id):
        def record(fn):
            self.aot[plugin_id] = fn
            return fn
        return record

    @staticmethod
    def max(a, b):
        return max(a, b)

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)

    @staticmethod
    def SymInt32(e):
        return int(e)


_TRT = SimpleNamespace(float32="float32", float16="float16", bfloat16="bfloat16")
_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@pytest.fixture
def aot(monkeypatch):
    """``aot(op, capability, dtype, K, D, d_constant)`` -> (returned tuple, the compiled AotKernel)."""
    from irc.exporters.tensorrt import kernels, plugins

    trtp = _FakeTrtp()
    plugins._register_gather(_TRT, trtp)
    plugins._register_scatter(_TRT, trtp)
    compile_aot, compiled = kernels.compile_aot, []

    def run(op, capability, dtype, k, d, d_constant=True):
        target = _target(capability)

        def for_target(*args, **kwargs):
            try:
                kernel = compile_aot(*args, **kwargs, target=target)
            except RuntimeError as e:  # Triton finds ptxas (bundled in its wheel) or stops here
                if "ptxas" in str(e):
                    pytest.skip(f"triton cannot compile for {target} here: {e}")
                raise
            compiled.append(kernel)
            return kernel

        monkeypatch.setattr(kernels, "compile_aot", for_target)
        n, k, d = _Expr(4 * k + 3, False), _Expr(k, False), _Expr(d, d_constant)
        if op == "gather":
            x = SimpleNamespace(dtype=dtype, shape_expr=[n, d])
            returned = trtp.aot["irc::TokenGather"](x, SimpleNamespace(shape_expr=[k]), [])
        else:
            base = SimpleNamespace(dtype=dtype, shape_expr=[n, d])
            src = SimpleNamespace(dtype=dtype, shape_expr=[k, d])
            returned = trtp.aot["irc::TokenScatter"](base, src, SimpleNamespace(shape_expr=[k]), [])
        assert len(compiled) == 1
        return returned, compiled.pop()

    return run


def _entry_params(ptx: str, name: str) -> list[str]:
    entry = ptx[ptx.index(f".entry {name}("):]
    entry = entry[: entry.index(")")]
    return [t for t, _ in re.findall(r"\.param (\.\w+)(?: \.ptr \.global \.align \d+)? (\w+)", entry)]


@pytest.mark.parametrize("dtype", sorted(_TRITON))
@pytest.mark.parametrize("sm", sorted(TARGETS))
@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_aot_impl_returns_ptx_for_the_target_and_the_launch_it_was_compiled_for(aot, op, sm, dtype):
    K, D = 37, 576
    (name, ptx, params, extras), kernel = aot(op, TARGETS[sm], dtype, K, D)
    name, ptx = name.decode(), ptx.decode()

    # the PTX is the kernel compiled for this GPU, under the name returned with it
    assert name == kernel.name == f"_token_{op}_aot" and ptx == kernel.ptx
    # Triton targets the arch-specific sm_90a for capability 9.0 (runs on H100/H200 only)
    assert re.search(rf"^\.target {sm}a?$", ptx, re.M), re.findall(r"^\.target .*$", ptx, re.M)
    assert re.search(rf"^\.visible \.entry {name}\(", ptx, re.M)
    assert kernel.block_d == 1024  # D = 576 <= 1024: one block spans the row

    # threads per program: what the PTX requires (.reqntid = num_warps * 32), nothing else
    reqntid = re.search(r"\.reqntid (\d+)", ptx)
    assert reqntid and params.block_x == kernel.block_x == int(reqntid.group(1))
    assert params.block_x % 32 == 0 and params.block_y == params.block_z == 1
    assert params.shared_mem == kernel.shared_mem >= 0

    # grid: one program per selected token, column blocks of the compiled BLOCK_D
    assert (params.grid_x, params.grid_y, params.grid_z) == (K, math.ceil(D / kernel.block_d), 1)

    # extras: K, D and the row/column strides of a contiguous [*, D] input and output,
    # as many as the entry point's int32 parameters
    assert extras == (K, D, D, 1, D, 1)
    pointers = 2 if op == "gather" else 3
    assert _entry_params(ptx, name)[: pointers + 7] == [".u64"] * pointers + [".u32"] * len(extras) + [".u64"]


@pytest.mark.parametrize("K,D,constant,block_d", [
    (0, 64, True, 64),  # an empty selection still launches one (guarded) program
    (5, 65, True, 128),
    (5, 1500, True, 1024),  # wider than one block: two column blocks
    (3, 64, False, 1024),  # D unknown at build time: the widest block, masked
    (3, 1500, False, 1024),
], ids=["empty", "odd-width", "two-blocks", "dynamic-narrow", "dynamic-wide"])
def test_grid_and_block_width_follow_k_and_d(aot, K, D, constant, block_d):
    (_, ptx, params, _), kernel = aot("gather", 80, "float16", K, D, constant)
    assert kernel.block_d == block_d
    assert (params.grid_x, params.grid_y) == (max(K, 1), math.ceil(D / block_d))
    assert b".target sm_80" in ptx
