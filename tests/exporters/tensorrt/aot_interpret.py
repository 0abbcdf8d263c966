"""Check the AOT entry points (``irc.exporters.tensorrt.kernels``) under ``TRITON_INTERPRET=1``.

Run in a fresh interpreter (``python aot_interpret.py``), like ``tests/ops/triton_interpret.py``,
whose cases (dtypes fp32/fp16/bf16, odd widths, rows wider than one block, an empty
selection, strided inputs) it reuses. Launches follow TensorRT's AOT convention: grid
``max(K, 1)`` and the output last. Outputs are poisoned with NaN first. Prints one JSON
object ``{case: null | traceback}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for ops.triton_interpret

from ops.triton_interpret import run_cases  # noqa: E402


def _check(torch, x, src, index) -> None:
    from irc.exporters.tensorrt.kernels import launch_gather_aot, launch_scatter_aot
    from irc.ops.token_gather import token_gather_reference
    from irc.ops.token_scatter import token_scatter_reference

    # TensorRT hands contiguous tensors; the entry points take the strides anyway
    poisoned = torch.full((index.shape[0], x.shape[1]), float("nan"), dtype=x.dtype)  # [K, D]
    got = launch_gather_aot(x, index, poisoned)
    assert torch.equal(got, token_gather_reference(x, index)), "gather differs from the reference"

    base = x.contiguous()
    base[index] = float("nan")  # rows the in-place scatter must overwrite
    want = token_scatter_reference(base, src, index)
    got = launch_scatter_aot(base, src, index)  # in place: base is the aliased output
    assert not torch.isnan(got).any(), "a selected row was left unwritten"
    assert torch.equal(got, want), "scatter differs from the reference"


def main() -> dict[str, str | None]:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before running this script")
    import torch

    return run_cases(torch, _check)


if __name__ == "__main__":
    print(json.dumps(main()))
