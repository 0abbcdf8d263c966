"""Check the irc Triton kernels against their references under ``TRITON_INTERPRET=1``.

Run as a script in a fresh interpreter (``python triton_interpret.py gather|scatter``):
``TRITON_INTERPRET`` must be set before triton is imported, so the tests start this in a
subprocess and leave their own session untouched. Prints one JSON object,
``{case_id: null | "error"}``. Outputs are poisoned with NaN before the kernel runs, so
a row the kernel fails to write cannot pass.

Importing this module (for ``CASES`` and ``run_interpreted``) imports neither torch nor
triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

# (dtype, N tokens, D hidden, K selected, layout). D covers a tiny row, odd widths (65),
# the SmolLM2 width (576) and a row wider than one 1024-column block (1500, masked tail).
_SHAPES = [
    ("float32", 9, 64, 4, "contiguous"),
    ("float16", 9, 65, 4, "contiguous"),
    ("bfloat16", 9, 65, 4, "contiguous"),
    ("float32", 6, 576, 3, "contiguous"),
    ("float16", 6, 576, 3, "contiguous"),
    ("bfloat16", 6, 576, 3, "contiguous"),
    ("float32", 5, 1500, 2, "contiguous"),
    ("float32", 7, 65, 7, "contiguous"),  # K = N: every token, permuted
    ("float32", 7, 65, 0, "contiguous"),  # empty selection
    ("bfloat16", 8, 65, 3, "strided"),  # rows with a stride wider than D, index strided
]

CASES = [f"{dtype}-N{n}-D{d}-K{k}-{layout}" for dtype, n, d, k, layout in _SHAPES]


def _inputs(torch, dtype_name: str, n: int, d: int, k: int, layout: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    index = torch.randperm(n, generator=gen)[:k]  # [K], unique
    if layout == "strided":
        x = torch.randn(n, d + 7, generator=gen).to(dtype)[:, :d]  # [N, D], stride D + 7
        src = torch.randn(k, 2 * d, generator=gen).to(dtype)[:, ::2]  # [K, D], stride 2
        index = torch.stack([index, index], dim=1).reshape(-1)[::2]  # [K], stride 2
    else:
        x = torch.randn(n, d, generator=gen).to(dtype)  # [N, D]
        src = torch.randn(k, d, generator=gen).to(dtype)  # [K, D]
    return x, src, index


def _check_gather(torch, x, src, index) -> None:
    from irc.ops.token_gather import token_gather_reference, token_gather_triton

    poisoned = torch.full((index.shape[0], x.shape[1]), float("nan"), dtype=x.dtype)  # [K, D]
    got = token_gather_triton(x, index, out=poisoned)
    want = token_gather_reference(x, index)
    assert got.data_ptr() == poisoned.data_ptr(), "kernel did not write into the given out"
    assert torch.equal(got, want), f"max abs diff {(got.float() - want.float()).abs().max()}"


def _check_scatter(torch, x, src, index) -> None:
    from irc.ops.token_scatter import token_scatter_reference, token_scatter_triton

    base = x  # keeps the strided layout of the "strided" cases
    base[index] = float("nan")  # rows the kernel must overwrite
    got = token_scatter_triton(base, src, index)
    want = token_scatter_reference(base, src, index)
    assert not torch.isnan(want).any(), "reference left a poisoned row"
    assert torch.equal(got, want), f"max abs diff {(got.float() - want.float()).abs().max()}"


def main(op: str) -> dict[str, str | None]:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before running this script")
    import torch

    return run_cases(torch, {"gather": _check_gather, "scatter": _check_scatter}[op])


def run_cases(torch, check) -> dict[str, str | None]:
    """``check(torch, x, src, index)`` on every case: ``{case: None | traceback}``."""
    results: dict[str, str | None] = {}
    for seed, (case, shape) in enumerate(zip(CASES, _SHAPES, strict=True)):
        try:
            check(torch, *_inputs(torch, *shape, seed=seed))
            results[case] = None
        except Exception:
            results[case] = traceback.format_exc()
    return results


def run_interpreted(op: str) -> dict[str, str | None]:
    """Run this script for ``op`` in a subprocess; return its per-case results.

    Raises ``LookupError`` when triton is not installed, so callers can skip.
    """
    if importlib.util.find_spec("triton") is None:
        raise LookupError(
            "triton is not installed; pip install 'triton>=3.2' (the dev extra) to check the "
            "kernels under TRITON_INTERPRET=1"
        )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, op],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(__file__).name} {op} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
