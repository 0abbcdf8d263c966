"""Token windows for the training stages: deterministic, disjoint slices of a stream."""

from __future__ import annotations

import numpy as np
import torch

from irc.errors import UserError


def make_windows(stream: np.ndarray, seq_len: int, count: int, *, start: int = 0) -> torch.Tensor:
    """``count`` consecutive non-overlapping windows of ``seq_len`` tokens from ``start``: ``[count, seq_len]``."""
    need = start + count * seq_len
    if need > len(stream):
        raise UserError(f"the training data holds {len(stream):,} tokens; {count} windows of {seq_len} "
                        f"from token {start:,} need {need:,} (use more data or a smaller preset)")
    return torch.as_tensor(stream[start:need].astype(np.int64)).view(count, seq_len)


def batches(windows: torch.Tensor, batch_size: int):
    for i in range(0, len(windows), batch_size):
        yield windows[i : i + batch_size]
