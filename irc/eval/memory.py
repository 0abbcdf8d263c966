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
