"""The TensorRT AOT entry points of the irc kernels: interpreted on the CPU, and compiled to PTX.

The copy loops are the ops' own Triton kernels (``tests/ops`` checks them directly); what
is new here is the argument order and the empty-selection guard of a TensorRT launch,
and that ``triton.compile`` turns each entry point into PTX with the parameter list
TensorRT fills: tensor inputs, six int32 extras, the output.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ops.triton_interpret import CASES

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton: pip install 'triton>=3.2' (the dev extra)")

_REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_interpret.py"))], env=env,
                          cwd=_REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_aot_entry_points_equal_the_references_under_the_interpreter(interpreted, case):
    assert interpreted[case] is None, interpreted[case]


def _cuda_target():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton has no NVIDIA backend here: {e}")
    return GPUTarget("cuda", 90, 32)  # sm_90 (H100/H200); compiling needs no GPU


@pytest.mark.parametrize("op,inputs", [("gather", 2), ("scatter", 3)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_entry_points_compile_to_ptx_with_the_tensorrt_parameter_order(op, inputs, dtype):
    from irc.exporters.tensorrt.kernels import compile_aot

    kernel = compile_aot(op, dtype, block_d=1024, target=_cuda_target())
    assert kernel.name == f"_token_{op}_aot" and kernel.block_x % 32 == 0 and kernel.shared_mem >= 0
    entry = kernel.ptx[kernel.ptx.index(f".entry {kernel.name}("):]
    entry = entry[: entry.index(")")]
    types = [t for t, _ in re.findall(r"\.param (\.\w+)(?: \.ptr \.global \.align \d+)? (\w+)", entry)]
    # inputs (pointers), K, D and four strides (int32), the output (pointer); Triton >= 3.3
    # appends its global/profile scratch pointers, unused by these kernels (no scratch)
    assert types[: inputs + 7] == [".u64"] * inputs + [".u32"] * 6 + [".u64"]
    assert all(t == ".u64" for t in types[inputs + 7:])


def test_block_width_follows_the_ops_launchers():
    from irc.exporters.tensorrt.kernels import block_d_for, compile_aot

    assert [block_d_for(d) for d in (1, 64, 65, 576, 1024, 1500, 4096, None)] == \
        [1, 64, 128, 1024, 1024, 1024, 1024, 1024]
    with pytest.raises(ValueError, match="dtype"):
        compile_aot("gather", "fp64", block_d=64)
    with pytest.raises(ValueError, match="op must be"):
        compile_aot("sort", "fp32", block_d=64)
