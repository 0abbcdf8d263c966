"""Choosing the next token from logits: greedy, temperature, nucleus (top-p).

Legend: B batch, V vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from irc.errors import UserError

KV_CACHES = ("static", "copy")


@dataclass(frozen=True)
class GenerationConfig:
    """How many tokens to generate and how to pick them.

    - ``temperature``: 0 is greedy (argmax); otherwise logits are divided by it and sampled;
    - ``top_p``: sample from the smallest set of tokens whose probability reaches p (1: all);
    - ``seed``: the sampling generator's seed (None: nondeterministic);
    - ``stop_at_eos``: a row stops at the tokenizer's end-of-sequence token(s);
    - ``kv_cache``: ``static`` (default): preallocated cache buffers that each step writes
      in place (``irc.generation.static_cache``; ONNX Runtime: I/O binding, the cache stays
      in ORT's OrtValues); ``copy``: each step returns a new cache, the past copied into it.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    kv_cache: str = "static"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.kv_cache not in KV_CACHES:
            raise UserError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """``logits [B, V]`` → token ids ``[B]``."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)  # [B, V]
    if config.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass before it is below p (so the top token always stays)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= config.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
