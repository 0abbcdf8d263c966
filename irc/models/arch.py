"""Architecture facts of a decoder LM, and the FLOPs of its units.

One place answers "how big is this model and what does each unit cost", for
the FLOP accounting of dense and routed models alike. Any Hugging Face decoder
is described: whether irc can route it is decided by its graph
(``irc.passes.find_units``), not by a list of families.

FLOPs count a multiply-add as 2. Per token, for a causal prefill of T tokens:

- attention, key/value path (every token, routed or not): k_proj and v_proj,
  ``2·D·(2·KV·hd)``;
- attention, query path (skipped by approximated tokens): q_proj ``2·D·H·hd``,
  scores and weighted values ``4·H·hd·c`` with c keys attended, o_proj
  ``2·H·hd·D``; averaged over a causal prefill, c̄ = (T + 1) / 2. A fused
  q/k/v projection (Phi-3, GPT-NeoX) is one matrix: the query path of an
  executed token runs all of it, so its key/value part counts twice there;
- MLP: ``2 ·`` the weights a token reads: gated (gate, up, down) ``3·D·I``, plain
  (up, down: GPT-NeoX) ``2·D·I``; a mixture of experts reads its router ``D·E``
  and its ``k`` active experts;
- LM head: ``2·D·V``.
Norms, rotary embeddings, softmax and residual adds are left out (under 1%).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# model_type → a short description: the families whose tiny models the test suite
# routes (tests/tiny.py), by the structure the pass found in their graphs. Other
# decoders route when their graph has the same structures.
VERIFIED_FAMILIES: dict[str, str] = {
    "llama": "pre-norm: Llama 2/3, SmolLM/SmolLM2, TinyLlama",
    "mistral": "pre-norm: Mistral",
    "qwen2": "pre-norm: Qwen2, Qwen2.5",
    "qwen3": "pre-norm: Qwen3 (dense)",
    "smollm3": "pre-norm: SmolLM3",
    "gemma": "pre-norm: Gemma",
    "glm": "pre-norm, fused gate/up: GLM-4",
    "stablelm": "pre-norm (LayerNorm with bias): StableLM",
    "gemma2": "pre- and post-norm, eager soft-capped attention: Gemma 2",
    "gemma3_text": "pre- and post-norm: Gemma 3 (text)",
    "olmo2": "post-norm only: OLMo 2",
    "phi3": "fused qkv and gate/up: Phi-3",
    "granite": "residual scale: Granite",
    "cohere": "parallel residual, one shared norm: Cohere (Command R)",
    "gpt_neox": "parallel residual, two norms, fused qkv: GPT-NeoX, Pythia",
    "mixtral": "mixture of experts: Mixtral",
    "qwen3_moe": "mixture of experts: Qwen3-MoE",
}
# kept for callers of the earlier name
SUPPORTED_FAMILIES = VERIFIED_FAMILIES


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
    # the MLP's weights one token reads (gated 3·D·I; plain 2·D·I; MoE: router + k experts)
    mlp_weights: int = 0
    n_experts: int = 0  # 0: a dense MLP
    experts_per_token: int = 0
    fused_qkv: bool = False

    @classmethod
    def from_config(cls, config) -> Architecture:
        family = getattr(config, "model_type", None) or "?"
        hidden = config.hidden_size
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // n_heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        n_experts = int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)
        k = int(getattr(config, "num_experts_per_tok", None) or 0) if n_experts else 0
        mlp_weights, fused = _weights_per_token(config, hidden, n_experts, k)
        return cls(
            family=family,
            n_layers=config.num_hidden_layers,
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            intermediate=intermediate,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_positions=getattr(config, "max_position_embeddings", 0) or 0,
            mlp_weights=mlp_weights or 3 * hidden * intermediate,
            n_experts=n_experts,
            experts_per_token=k,
            fused_qkv=fused,
        )

    # --- FLOPs per token -------------------------------------------------
    def attention_kv_flops(self) -> int:
        """k_proj + v_proj: run by every token, executed or approximated."""
        return 2 * self.hidden * 2 * self.n_kv_heads * self.head_dim

    def attention_query_flops(self, context: float) -> float:
        """q_proj, scores, weighted values and o_proj of one token attending to ``context`` keys."""
        qd = self.n_heads * self.head_dim
        fused = self.attention_kv_flops() if self.fused_qkv else 0
        return 2 * self.hidden * qd + 4 * qd * context + 2 * qd * self.hidden + fused

    def attention_flops(self, seq_len: int) -> float:
        """Whole attention unit, per token, averaged over a causal prefill of ``seq_len``."""
        return self.attention_kv_flops() + self.attention_query_flops(mean_context(seq_len))

    def mlp_flops(self) -> int:
        return 2 * (self.mlp_weights or 3 * self.hidden * self.intermediate)

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
            + (f", {self.experts_per_token} of {self.n_experts} experts" if self.n_experts else "")
        )

    def to_dict(self) -> dict:
        return asdict(self)


def mean_context(seq_len: int) -> float:
    """Mean number of keys a token attends to in a causal prefill of ``seq_len``."""
    return (seq_len + 1) / 2


def _weights_per_token(config, hidden: int, n_experts: int, k: int) -> tuple[int, bool]:
    """The MLP weights a token reads and whether q/k/v are one matrix, from the model's own modules.

    The model is built on the meta device (no memory, no weights): its layer 0 has an
    attention child (a class named ``*Attention``) and one other child with matrices, the MLP.
    Returns ``(0, False)`` where the modules do not read that way (the caller then assumes a
    gated MLP).
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # a config transformers cannot build: keep the gated default
        return 0, False
    import torch

    layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                   and len(m) == config.num_hidden_layers), None)
    if layers is None:
        return 0, False
    attn = mlp = None
    for child in layers[0].children():
        matrices = [p for p in child.parameters() if p.dim() >= 2]
        if not matrices:
            continue
        if "attention" in type(child).__name__.lower():
            attn = child
        elif mlp is None:
            mlp = child
        else:
            return 0, False
    fused = attn is not None and sum(1 for m in attn.modules() if isinstance(m, torch.nn.Linear)) == 2
    if mlp is None:
        return 0, fused
    total = sum(p.numel() for p in mlp.parameters() if p.dim() >= 2)
    if not n_experts or not k:
        return total, fused
    router = hidden * n_experts
    return router + k * (total - router) // n_experts, fused
