"""(c) query-sparse attention against an independent reference: the model's own
attention module run densely (all tokens' keys and values), rows of the executed
tokens compared."""

import pytest
import torch
from routed_helpers import batch, random_masks, tiny_routed

from irc.plan import RoutingPlan

from tiny import FAMILIES
from tolerances import ROUTED_EQUAL


def _unit_inputs(routed, name, ids, mask):
    """The arguments the routed unit receives in a forward pass."""
    captured = {}
    unit = routed.units[name]
    handle = unit.register_forward_pre_hook(lambda m, args: captured.setdefault("args", args))
    with torch.no_grad():
        routed(ids, mask)
    handle.remove()
    return captured["args"]


def _reference_attention(loaded, layer, x, pad, keep=None):
    """HF's attention module on every token; keys limited by causality, padding and ``keep``."""
    model = loaded.model.model
    B, T, _ = x.shape
    positions = torch.arange(T).unsqueeze(0).expand(B, T)
    cos, sin = model.rotary_emb(x, positions)
    keys = pad if keep is None else pad & keep
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]
    block = model.layers[layer]
    a = block.input_layernorm(x)
    out, _ = block.self_attn(a, position_embeddings=(cos, sin), attention_mask=allowed)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_policy", ["keep", "drop"])
@pytest.mark.parametrize("T", [7, 64])
def test_query_sparse_attention_rows(family, kv_policy, T):
    loaded, routed = tiny_routed(family, RoutingPlan(kv_policy=kv_policy, lff_rank=16, n_sink=2))
    ids, mask = batch(T)
    pad = mask.bool()
    masks = random_masks(routed, ids.shape, 0.4, seed=T)
    routed.set_routing("mask", masks=masks, sparse=True)
    name = "layer1_attn"
    args = _unit_inputs(routed, name, ids, mask)
    unit = routed.units[name]
    with torch.no_grad():
        got = unit(*args)
    execute = (masks[name] | (torch.cumsum(mask, 1) <= 2)) & pad  # sinks are the first 2 real tokens
    keep = execute if kv_policy == "drop" else None
    with torch.no_grad():
        want = _reference_attention(loaded, 1, args[0], pad, keep)
    assert (got - want)[execute].abs().max() <= ROUTED_EQUAL
    assert torch.all(got[~pad] == 0)  # padding contributes nothing
