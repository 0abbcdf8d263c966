"""``bench/gpu_check.sh --dry-run`` runs to completion on the CPU (tiny shapes, Triton interpreter)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (the dev extra)")
def test_gpu_check_dry_run_completes_and_writes_labelled_results(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(_REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out-dir", str(tmp_path)],
                          env=env, cwd=_REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("PASSED gpu_check") and "| check | result |" in proc.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True and all(r["passed"] for r in result["kernels"])
    assert any(r["K"] == 0 for r in result["kernels"])  # an empty selection
    assert {r["dtype"] for r in result["kernels"]} == {"float32", "float16", "bfloat16"}
    assert len(result["prefill"]) == 4 and all(set(r["routed_ms"]) == {"1.0", "0.75", "0.5"}
                                               for r in result["prefill"])
    assert "DRY RUN" in (tmp_path / "gpu_check.md").read_text()
