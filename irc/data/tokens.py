"""Token streams and evaluation windows, with an explicit BOS policy.

BOS policies (``bos``):

- ``none``     — documents joined by the tokens of a blank line, no BOS anywhere
                 (SmolLM2's tokenizer adds none; this matches how its perplexity
                 is usually reported);
- ``document`` — the BOS token starts every document;
- ``window``   — the stream as for ``none``, and every evaluation window starts
                 with BOS followed by ``seq_len - 1`` tokens.

Streams are cached under ``tokens/`` keyed by the corpus text, the tokenizer and
the policy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from irc.cache import atomic_file, cache_dir
from irc.data.corpus import Corpus
from irc.errors import UserError

BOS_POLICIES = ("none", "document", "window")
_SEPARATOR = "\n\n"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def bos_id(tokenizer) -> int:
    bid = getattr(tokenizer, "bos_token_id", None)
    if bid is None:
        raise UserError("this tokenizer has no BOS token; use --bos none")
    return int(bid)


def token_stream(corpus: Corpus, tokenizer, bos: str = "none") -> np.ndarray:
    """The corpus as one int32 token stream under the BOS policy (cached)."""
    if bos not in BOS_POLICIES:
        raise UserError(f"unknown BOS policy {bos!r}; expected one of {', '.join(BOS_POLICIES)}")
    key = f"{corpus.fingerprint[:20]}-{tokenizer_fingerprint(tokenizer)[:20]}-{bos}"
    path = cache_dir("tokens") / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    encoded = tokenizer(list(corpus.documents), add_special_tokens=False)["input_ids"]
    parts: list[list[int]] = []
    if bos == "document":
        first = bos_id(tokenizer)
        for ids in encoded:
            parts.append([first])
            parts.append(ids)
    else:
        sep = tokenizer(_SEPARATOR, add_special_tokens=False)["input_ids"]
        for i, ids in enumerate(encoded):
            if i:
                parts.append(sep)
            parts.append(ids)
    stream = np.fromiter((t for p in parts for t in p), dtype=np.int32)
    with atomic_file(path, "wb") as f:
        np.save(f, stream)
    return stream


@dataclass(frozen=True)
class Window:
    """One evaluation window: ``ids[score_from:]`` are the targets it scores."""

    ids: np.ndarray  # [L]
    score_from: int


def perplexity_windows(
    tokens: np.ndarray, seq_len: int, stride: int | None = None, bos: int | None = None
) -> list[Window]:
    """Sliding windows in which no token is scored twice.

    Without ``bos`` a window is ``seq_len`` stream tokens. Without overlap (the
    default) the first token of each window has no context inside it and is not
    scored: 20 windows of 1024 score 20 × 1023 tokens (the usual convention, as
    in Hugging Face's perplexity guide). With ``bos`` a window is BOS plus
    ``seq_len - 1`` stream tokens and every stream token is scored. With
    ``stride`` below the window's length windows overlap, and a window scores only
    the tokens past the previous window's end, each seen with at least
    ``seq_len - stride`` tokens of context.
    """
    content = seq_len - (1 if bos is not None else 0)
    stride = content if stride is None else stride
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    if not 1 <= stride <= content:
        raise UserError(f"stride must be in [1, {content}] for seq_len {seq_len}, got {stride}")
    n = len(tokens)
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + content, n)
        if bos is None:
            if end - begin < 2:
                break
            ids = tokens[begin:end]
            score_from = max(prev_end - begin, 1)
        else:
            ids = np.concatenate([np.asarray([bos], dtype=tokens.dtype), tokens[begin:end]])
            score_from = max(prev_end - begin, 0) + 1
        windows.append(Window(ids, score_from))
        prev_end = end
        if end == n:
            break
    return windows
