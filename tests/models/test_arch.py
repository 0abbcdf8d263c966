"""FLOP formulas checked against the parameter counts of the real modules."""

import pytest

from irc.models.arch import Architecture, mean_context

from tiny import tiny_config, tiny_model


def _linear_params(module) -> int:
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_unit_flops_match_module_weights(family):
    model = tiny_model(family)
    arch = Architecture.from_config(model.config)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    # A linear layer costs 2 FLOPs per weight per token.
    assert arch.mlp_flops() == 2 * _linear_params(mlp)
    assert arch.attention_kv_flops() == 2 * (attn.k_proj.weight.numel() + attn.v_proj.weight.numel())
    qd = arch.n_heads * arch.head_dim
    context = 10
    expected_query = 2 * (attn.q_proj.weight.numel() + attn.o_proj.weight.numel()) + 4 * qd * context
    assert arch.attention_query_flops(context) == expected_query
    assert arch.head_flops() == 2 * model.lm_head.weight.numel()


def test_dense_flops_total():
    arch = Architecture.from_config(tiny_config("llama"))
    T = 9
    per_layer = arch.attention_kv_flops() + arch.attention_query_flops(5.0) + arch.mlp_flops()
    assert mean_context(T) == 5.0
    assert arch.dense_flops_per_token(T) == arch.n_layers * per_layer + arch.head_flops()
    assert arch.unit_flops("attn", T) + arch.unit_flops("mlp", T) == per_layer
    with pytest.raises(ValueError):
        arch.unit_flops("norm", T)


def test_any_family_is_described():
    from transformers import GPT2Config

    arch = Architecture.from_config(GPT2Config(n_layer=2, n_embd=64, n_head=4))
    assert (arch.family, arch.n_layers, arch.n_kv_heads, arch.head_dim) == ("gpt2", 2, 4, 16)
