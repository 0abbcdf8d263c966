"""Architecture facts of a supported decoder LM, and the FLOPs of its units.

One place answers "how big is this model and what does each unit cost", for
the FLOP accounting of dense and routed models alike.

FLOPs count a multiply-add as 2. Per token, for a causal prefill of T tokens:

- attention, key/value path (every token, routed or not): k_proj and v_proj,
  ``2·D·(2·KV·hd)``;
- attention, query path (skipped by approximated tokens): q_proj ``2·D·H·hd``,
  scores and weighted values ``4·H·hd·c`` with c keys attended, o_proj
  ``2·H·hd·D``; averaged over a causal prefill, c̄ = (T + 1) / 2;
- MLP (gated: gate, up, down): ``3 · 2·D·I``;
- LM head: ``2·D·V``.
Norms, rotary embeddings, softmax and residual adds are left out (under 1%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from irc.errors import UserError

# model_type → a short description. Each is a pre-norm decoder whose layers hold
# `self_attn` and a gated `mlp`, found by the routing pass from the graph itself.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM/SmolLM2, TinyLlama",
    "mistral": "Mistral",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3 (dense)",
}


@dataclass(frozen=True)
class Architecture:
    family: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    max_positions: int

    @classmethod
    def from_config(cls, config) -> Architecture:
        family = getattr(config, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
            raise UserError(
                f"unsupported architecture {family!r} "
                f"({', '.join(getattr(config, 'architectures', None) or ['?'])}); "
                f"irc supports: {supported}"
            )
        hidden = config.hidden_size
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // n_heads
        return cls(
            family=family,
            n_layers=config.num_hidden_layers,
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_positions=getattr(config, "max_position_embeddings", 0) or 0,
        )

    # --- FLOPs per token -------------------------------------------------
    def attention_kv_flops(self) -> int:
        """k_proj + v_proj: run by every token, executed or approximated."""
        return 2 * self.hidden * 2 * self.n_kv_heads * self.head_dim

    def attention_query_flops(self, context: float) -> float:
        """q_proj, scores, weighted values and o_proj of one token attending to ``context`` keys."""
        qd = self.n_heads * self.head_dim
        return 2 * self.hidden * qd + 4 * qd * context + 2 * qd * self.hidden

    def attention_flops(self, seq_len: int) -> float:
        """Whole attention unit, per token, averaged over a causal prefill of ``seq_len``."""
        return self.attention_kv_flops() + self.attention_query_flops(mean_context(seq_len))

    def mlp_flops(self) -> int:
        return 3 * 2 * self.hidden * self.intermediate

    def head_flops(self) -> int:
        return 2 * self.hidden * self.vocab

    def unit_flops(self, kind: str, seq_len: int) -> float:
        if kind == "attn":
            return self.attention_flops(seq_len)
        if kind == "mlp":
            return float(self.mlp_flops())
        raise ValueError(f"unit kind must be 'attn' or 'mlp', got {kind!r}")

    def dense_flops_per_token(self, seq_len: int) -> float:
        """All layers and the LM head, per token, for a causal prefill of ``seq_len``."""
        per_layer = self.attention_flops(seq_len) + self.mlp_flops()
        return self.n_layers * per_layer + self.head_flops()

    def describe(self) -> str:
        return (
            f"{self.family}, {self.n_layers} layers, hidden {self.hidden}, "
            f"{self.n_heads} heads / {self.n_kv_heads} KV heads, head_dim {self.head_dim}, "
            f"intermediate {self.intermediate}, vocab {self.vocab}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def mean_context(seq_len: int) -> float:
    """Mean number of keys a token attends to in a causal prefill of ``seq_len``."""
    return (seq_len + 1) / 2
