"""The generation loop: prefill the prompt, then decode one token per step with a KV cache.

    import irc
    from irc.generation import GenerationConfig, generate

    routed = irc.load("runs/smollm2-s25")
    routed.set_routing("threshold")                    # per token, causal: valid while decoding
    ids = routed.tokenizer("The capital of France is", return_tensors="pt").input_ids
    result = generate(routed, ids, config=GenerationConfig(max_new_tokens=32))
    print(routed.tokenizer.decode(result.tokens[0]), result.tokens_per_s, result.execute_fraction)

``model`` is a ``RoutedModel`` (its routed decode graph, ``irc.generation.decoder``)
or anything with the same stepping interface (``OrtDecoder``: ONNX Runtime).
The prompt runs through the decode graph with an empty cache (P = 0; prompts
shorter than 4 tokens are left-padded to 4), then each step feeds the T = 1 new token. Batches are left-padded (``attention_mask`` 0 on
the padding); each row stops at end-of-sequence on its own and is then fed its
last token until every row is done (its outputs are dropped).

The KV cache (``config.kv_cache``): ``static`` (default) preallocates the cache for
the padded prompt plus ``max_new_tokens`` positions and every step writes its new
keys and values in place (``irc.generation.static_cache``; ONNX Runtime: I/O-bound
OrtValues, ``OrtDecoder``); ``copy`` is the functional cache, each step returning a
new cache with the past copied into it. Both give the same logits.

Legend: B batch, T prompt tokens, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from irc.generation.capture import MIN_CONTEXT
from irc.generation.sampling import GenerationConfig, next_token

# new-token positions a static cache is allocated for up front (irc generate clamps to the model's)
STATIC_NEW_TOKENS = 4096


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # per row, the generated tokens (end-of-sequence included, nothing after)
    prompt_tokens: int  # real prompt tokens, all rows
    prefill_seconds: float
    decode_seconds: float
    decode_tokens: int  # tokens produced by decode steps (the first token of each row comes from prefill)
    prefill_execute_fraction: float | None
    execute_fraction: float | None  # over every routed unit and every decoded token
    execute_fractions: dict[str, float | None] = field(default_factory=dict)  # per unit, decoding

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens produced by decode steps per second of decoding."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "decode_tokens": self.decode_tokens, "tokens_per_s": self.tokens_per_s,
                "prefill_execute_fraction": self.prefill_execute_fraction,
                "execute_fraction": self.execute_fraction, "execute_fractions": self.execute_fractions}


def stepper_for(model):
    """The object that runs steps: a routed model's decode graph, or ``model`` itself."""
    if hasattr(model, "step"):
        return model
    from irc.generation.decoder import decoder_for

    return decoder_for(model)


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    eos_token_ids: tuple[int, ...] | None = None,
    on_token: Callable[[int, torch.Tensor], None] | None = None,
) -> GenerationResult:
    """Generate up to ``config.max_new_tokens`` tokens after each row of ``input_ids [B, T]``.

    ``on_token(step, tokens [B])`` is called with every new token of every row
    (streaming). ``eos_token_ids`` default to the model's tokenizer's.
    """
    config = config or GenerationConfig()
    stepper = stepper_for(model)
    B = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    prompt_tokens = int(mask.sum())
    if input_ids.shape[1] < MIN_CONTEXT:  # the decode graph needs P + T >= 4: left-pad (never attended)
        extra = MIN_CONTEXT - input_ids.shape[1]
        input_ids = torch.cat([input_ids.new_zeros(B, extra), input_ids], dim=1)
        mask = torch.cat([mask.new_zeros(B, extra), mask], dim=1)
    if eos_token_ids is None:
        eos_token_ids = _eos_ids(model) if config.stop_at_eos else ()
    eos = torch.tensor(list(eos_token_ids) or [-1])
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    stepper.reset_stats()
    # LoRA weights are parametrizations (W + α/r·BA): computed once for the whole generation, not per step
    with torch.no_grad(), parametrize.cached():
        start = time.perf_counter()
        # static: room for the (padded) prompt and the new tokens (a longer run grows the buffers by
        # doubling: one copy each time); copy: a new cache every step
        capacity = input_ids.shape[1] + min(config.max_new_tokens, STATIC_NEW_TOKENS) \
            if config.kv_cache == "static" else None
        logits, past = stepper.step(input_ids, mask, stepper.empty_cache(B, capacity=capacity))
        token = next_token(logits[:, -1], config, generator)  # [B]
        prefill_seconds = time.perf_counter() - start
        prefill_fraction = stepper.execute_fraction()
        stepper.reset_stats()
        rows: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        last = token
        steps = 0
        start = time.perf_counter()
        for i in range(config.max_new_tokens):
            token = torch.where(done, last, token)  # finished rows repeat their last token
            for b in range(B):
                if not done[b]:
                    rows[b].append(int(token[b]))
            if on_token is not None:
                on_token(i, token.masked_fill(done, -1))
            done = done | torch.isin(token, eos)
            last = token
            if bool(done.all()) or i == config.max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            logits, past = stepper.step(token.unsqueeze(1), mask, past)
            token = next_token(logits[:, -1], config, generator)
            steps += 1
        decode_seconds = time.perf_counter() - start
    return GenerationResult(
        tokens=rows,
        prompt_tokens=prompt_tokens,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        decode_tokens=steps * B,
        prefill_execute_fraction=prefill_fraction,
        execute_fraction=stepper.execute_fraction(),
        execute_fractions=stepper.execute_fractions(),
    )


def _eos_ids(model) -> tuple[int, ...]:
    tokenizer = getattr(model, "tokenizer", None)
    if callable(tokenizer) and not hasattr(tokenizer, "eos_token_id"):
        tokenizer = tokenizer()
    ids = set()
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    base = getattr(model, "base", None)
    config_eos = getattr(getattr(getattr(base, "model", None), "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, list) else [config_eos]))
    return tuple(sorted(ids))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as ``(input_ids [B, T], attention_mask [B, T])``, left-padded."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, T - len(r):] = torch.tensor(r)
            mask[b, T - len(r):] = 1
    return ids, mask
