"""Perplexity of any causal LM over evaluation windows.

``model`` is anything that maps ``input_ids [B, T]`` to logits ``[B, T, V]`` (or
to an output with ``.logits``): a Hugging Face model, a captured or rewritten
``GraphModule``, a routed model. Every later evaluation (routed models, ONNX
files) goes through ``evaluate_perplexity``.

Legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from irc.data.tokens import Window, perplexity_windows
from irc.eval.memory import PeakMemory
from irc.progress import progress


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # tokens scored
    forward_tokens: int  # tokens run through the model
    windows: int
    seq_len: int
    stride: int
    seconds: float  # wall time of the forward passes and scoring
    tokens_per_s: float  # forward_tokens / seconds
    peak_memory_mb: float
    memory_kind: str  # "cpu-rss" (process peak RSS) or "cuda-allocated"

    def to_dict(self) -> dict:
        return asdict(self)


def logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


@torch.inference_mode()
def evaluate_perplexity(
    model: Callable,
    tokens: np.ndarray | torch.Tensor,
    *,
    seq_len: int = 1024,
    stride: int | None = None,
    max_tokens: int | None = None,
    bos: int | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity over the first ``max_tokens`` of ``tokens`` (see ``perplexity_windows``)."""
    stream = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    windows = perplexity_windows(stream, seq_len, stride, bos)
    if not windows:
        from irc.errors import UserError

        raise UserError(f"too few tokens to evaluate ({len(stream)})")
    batches = _batches(windows, batch_size)
    nll_sum = 0.0
    scored = 0
    forwarded = 0
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        bar = progress(total=sum(len(w.ids) for w in windows), desc="perplexity", unit="tok",
                       enabled=show_progress)
        for batch in batches:
            ids = torch.as_tensor(np.stack([w.ids for w in batch]), dtype=torch.long, device=device)
            logits = logits_of(model(ids))  # [B, T, V]
            for b, w in enumerate(batch):
                # logits at position t predict the token at t + 1
                pred = logits[b, w.score_from - 1 : -1].float()
                target = ids[b, w.score_from :]
                nll_sum += F.cross_entropy(pred, target, reduction="sum").item()
                scored += target.numel()
            forwarded += ids.numel()
            bar.update(ids.numel())
            bar.set_postfix(ppl=f"{math.exp(nll_sum / max(scored, 1)):.2f}")
        bar.close()
        seconds = time.perf_counter() - start
    nll = nll_sum / scored
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=scored,
        forward_tokens=forwarded,
        windows=len(windows),
        seq_len=seq_len,
        stride=stride or seq_len - (1 if bos is not None else 0),
        seconds=seconds,
        tokens_per_s=forwarded / seconds if seconds > 0 else float("inf"),
        peak_memory_mb=memory.peak_mb,
        memory_kind=memory.kind,
    )


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most ``batch_size`` at a time."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and len(last[0].ids) == len(w.ids):
            last.append(w)
        else:
            batches.append([w])
    return batches
