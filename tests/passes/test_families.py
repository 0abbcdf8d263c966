"""Any decoder (issue #13): the routing pass on tiny models of 13 more families.

Each family's graph has a unit structure the pass learns from the graph (see
``irc.passes.find_units``); per family, on a tiny random model (2 layers,
hidden 64, from its HF config class):

(a) the pass finds two units per layer, with the structure tags expected;
(b) dense mode equals the base model (odd length 7, a left-padded row);
(c) sparse execution equals dense compute-then-blend under one routing mask,
    and routing changes the output;
(d) every decode step's logits equal the routed prefill graph's logits.

The four original families run these checks in test_route_decoder_blocks.py
and tests/generation/test_generate.py.
"""

import pytest
import torch
from routed_helpers import batch, eager_and_traceable, random_masks, tiny_routed

from irc.generation.decoder import decoder_for
from irc.models.arch import Architecture

from tiny import MORE_FAMILIES, tiny_config
from tolerances import ROUTED_EQUAL

# the structure tags each family's units carry: (attention, MLP)
STRUCTURES = {
    "smollm3": ({"pre-norm"}, {"pre-norm"}),
    "gemma": ({"pre-norm"}, {"pre-norm"}),
    "glm": ({"pre-norm"}, {"pre-norm", "fused-gate-up"}),
    "stablelm": ({"pre-norm"}, {"pre-norm"}),
    "gemma2": ({"pre-norm", "post-norm"}, {"pre-norm", "post-norm"}),
    "gemma3_text": ({"pre-norm", "post-norm"}, {"pre-norm", "post-norm"}),
    "olmo2": ({"no-pre-norm", "post-norm"}, {"no-pre-norm", "post-norm"}),
    "phi3": ({"pre-norm", "fused-qkv"}, {"pre-norm", "fused-gate-up"}),
    "granite": ({"pre-norm", "residual-scale"}, {"pre-norm", "residual-scale"}),
    "cohere": ({"pre-norm", "parallel"}, {"pre-norm", "parallel"}),
    "gpt_neox": ({"pre-norm", "fused-qkv", "parallel"}, {"pre-norm", "parallel"}),
    "mixtral": ({"pre-norm"}, {"pre-norm", "moe"}),
    "qwen3_moe": ({"pre-norm"}, {"pre-norm", "moe"}),
}


def test_every_family_has_its_structure_listed():
    assert set(STRUCTURES) == set(MORE_FAMILIES)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_family_routes(family):
    loaded, routed = tiny_routed(family)
    assert list(routed.units) == ["layer0_attn", "layer0_mlp", "layer1_attn", "layer1_mlp"]
    attn_tags, mlp_tags = STRUCTURES[family]
    for name, unit in routed.units.items():
        assert set(unit.structure) == (attn_tags if unit.kind == "attn" else mlp_tags), name
    ids, mask = batch(7)
    real = mask.bool()
    masks = random_masks(routed, ids.shape, 0.5, seed=7)
    with torch.no_grad():
        routed.set_routing("dense")
        dense = routed(ids, mask)
        want = loaded.model(input_ids=ids, attention_mask=mask).logits
        routed.set_routing("mask", masks=masks, sparse=True)
        sparse = routed(ids, mask)
        routed.set_routing("mask", masks=masks, sparse=False)
        blend = routed(ids, mask)
    assert (dense - want)[real].abs().max() <= ROUTED_EQUAL
    assert (sparse - blend)[real].abs().max() <= ROUTED_EQUAL
    assert (sparse - dense)[real].abs().max() > 1e-3  # routing really changed something


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_family_decodes_as_prefill(family):
    _, routed = tiny_routed(family)
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (1, 10), generator=g)
    prompt = 5  # past the tiny Gemma models' sliding window of 4
    with torch.no_grad():
        want = routed(ids)  # [1, T, V]
        logits, past = decoder.step(ids[:, :prompt], torch.ones(1, prompt, dtype=torch.long),
                                    decoder.empty_cache(1))
        steps = [logits]
        for t in range(prompt, ids.shape[1]):
            logits, past = decoder.step(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), past)
            steps.append(logits)
    assert (torch.cat(steps, dim=1) - want).abs().max() <= ROUTED_EQUAL
    fraction = decoder.execute_fraction()
    assert fraction is not None and 0.0 < fraction < 1.0


@pytest.mark.parametrize("family", ["gpt_neox", "mixtral", "qwen3_moe", "phi3"])
def test_mlp_flops_match_the_weights_a_token_reads(family):
    arch = Architecture.from_config(tiny_config(family))
    D, inner = arch.hidden, arch.intermediate
    if family == "gpt_neox":  # plain MLP: up and down
        assert arch.mlp_flops() == 2 * 2 * D * inner
    elif family == "mixtral":  # router + 2 of 4 gated experts of width inner
        assert arch.mlp_flops() == 2 * (D * 4 + 2 * 3 * D * inner)
    elif family == "qwen3_moe":  # experts of width moe_intermediate_size 32
        assert arch.mlp_flops() == 2 * (D * 4 + 2 * 3 * D * 32)
    else:
        assert arch.mlp_flops() == 2 * 3 * D * inner
    # a fused q/k/v projection runs whole in an executed token's query path
    assert arch.fused_qkv == (family in ("gpt_neox", "phi3"))


@pytest.mark.parametrize("family", ["olmo2", "granite", "gpt_neox", "mixtral"])  # one per structure
def test_family_trains_and_calibrates(family):
    from irc.eval.calibrate import calibrate_thresholds
    from irc.train.lff_fit import fit_closed_form, forecaster_errors
    from irc.train.router_train import RouterTrainConfig, train_routers

    torch.manual_seed(0)
    _, routed = tiny_routed(family, randomize=False)
    windows = torch.randint(3, 300, (20, 32), generator=torch.Generator().manual_seed(0))
    fit_closed_form(routed, windows[:10], show_progress=False)
    assert all(e < 0.95 for e in forecaster_errors(routed, windows[:10]).values())
    state = train_routers(routed, windows[10:], RouterTrainConfig(sparsity=0.8, steps=20, batch_size=5, lr=1e-2),
                          show_progress=False)
    first, last = state.history[0]["exec"], state.history[-1]["exec"]
    assert abs(last - 0.2) < abs(first - 0.2)
    calibrate_thresholds(routed, windows[10:], 0.5, show_progress=False)
    routed.set_routing("threshold")
    routed.reset_stats()
    with torch.no_grad():
        routed(windows[10:14])
    fractions = [u.execute_fraction for u in routed.units.values()]
    assert 0.0 < sum(fractions) / len(fractions) < 1.0


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_family_traceable_routing_equals_eager(family):
    # the branch-free path torch.export (and so ONNX) captures, in both inference modes
    _, routed = tiny_routed(family)
    ids, mask = batch(7)
    real = mask.bool()
    for mode, setting in (("capacity", {"capacity": 0.5}), ("threshold", {})):
        want, got = eager_and_traceable(routed, ids, mask, mode, **setting)
        assert (got - want)[real].abs().max() <= ROUTED_EQUAL, mode
