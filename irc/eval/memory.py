"""Peak memory over a block of work.

On CUDA: the peak of ``torch.cuda.max_memory_allocated`` within the block.
On the CPU: the process's peak resident set size (``ru_maxrss``), which covers
the whole process lifetime (model loading included), the only peak the kernel
keeps for us without sampling.
"""

from __future__ import annotations

import resource
import sys

import torch


class PeakMemory:
    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak_mb = 0.0
        self.kind = "cuda-allocated" if self.device.type == "cuda" else "cpu-rss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mb = peak_rss_mb()


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class RssPeak:
    """Peak resident set size over a block, sampled every ``interval`` seconds by a thread.

    ``ru_maxrss`` never goes down, so after the model is loaded it cannot tell one
    forward pass from another; sampling ``/proc/self/statm`` can. ``extra_mb`` is the
    peak over the RSS at entry: the memory the block itself needed. Linux only
    (elsewhere both stay 0).
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_mb = 0.0
        self.extra_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize() / 2**20
        except OSError:
            return 0.0

    def __enter__(self) -> RssPeak:
        import threading

        self._base = self._rss_mb()
        self.peak_mb = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, self._rss_mb())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())
        self.extra_mb = self.peak_mb - self._base
