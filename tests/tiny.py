"""Tiny random-weight models and a tiny tokenizer, built from HF config classes.

Two layers, hidden 64: big enough to have every structural feature of the real
families (GQA, biases in Qwen2, q/k norms in Qwen3), small enough that the
default test tier runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# the families of issue #13, grouped by the unit structure the routing pass learns
# from their graphs (irc.passes.find_units): see STRUCTURES
MORE_FAMILIES = (
    "smollm3", "gemma", "glm", "gemma2", "gemma3_text", "olmo2", "phi3", "granite",
    "stablelm", "cohere", "gpt_neox", "mixtral", "qwen3_moe",
)
ALL_FAMILIES = FAMILIES + MORE_FAMILIES
VOCAB = 320

_TEXT = (
    "The quick brown fox jumps over the lazy dog. Routing decides, per token, whether a unit "
    "runs or is forecast. Paris is the capital of France; Berlin is the capital of Germany. "
    "Numbers like 12, 345 and 6789 appear in text, as do names such as Ada and Alan. "
)


def tiny_config(family: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    return _more_config(family, common)


def _more_config(family: str, common: dict):
    from transformers import AutoConfig

    c = dict(common)
    extra: dict = {}
    if family == "smollm3":
        extra = dict(no_rope_layers=[1, 0])  # layer 1 without rotary embeddings
    elif family in ("gemma", "gemma2", "gemma3_text"):
        extra = dict(head_dim=16)
        if family != "gemma":
            extra.update(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                         query_pre_attn_scalar=16)
        if family == "gemma2":
            # Gemma2 runs eager attention (SDPA has no logit soft-capping): matmul, tanh, softmax
            extra.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    elif family == "glm":
        extra = dict(head_dim=16)
    elif family == "granite":
        extra = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                     logits_scaling=4.0)
    elif family == "stablelm":
        extra = dict(use_qkv_bias=True)
    elif family == "cohere":
        extra = dict(logit_scale=0.5)
    elif family == "gpt_neox":
        c.pop("num_key_value_heads")
        extra = dict(use_parallel_residual=True)
    elif family == "mixtral":
        extra = dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    elif family == "qwen3_moe":
        extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)
    elif family not in ("olmo2", "phi3"):
        raise ValueError(family)
    return AutoConfig.for_model(family, **c, **extra)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # Random init gives near-uniform logits; a larger spread makes numbers differ visibly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences; ids < VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def save_tiny(family: str, directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def sample_text() -> str:
    return _TEXT
