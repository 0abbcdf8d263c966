"""The routing pass on tiny models of every family: structure and numbers.

(a) dense mode equals the un-routed model; (b) sparse execution equals dense
compute-then-blend under the same routing mask; (d) kv_policy="drop" likewise.
"""

import pytest
import torch
from routed_helpers import batch, random_masks, tiny_routed

from irc.nn.routed_layer import RoutedLayer
from irc.nn.routed_unit import RoutedUnit
from irc.plan import RoutingPlan

from tiny import FAMILIES
from tolerances import ROUTED_EQUAL

LENGTHS = (1, 7, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_units_are_routed(family):
    _, routed = tiny_routed(family)
    assert list(routed.units) == ["layer0_attn", "layer0_mlp", "layer1_attn", "layer1_mlp"]
    assert all(isinstance(u, RoutedUnit) for u in routed.units.values())
    attn = routed.units["layer0_attn"]
    assert attn.kv is not None and attn.query is not None
    # the base weights live in the routed units only
    names = {n for n, _ in routed.gm.named_parameters()}
    assert "layer0_attn.body.q_proj.weight" in names
    assert not any(n.startswith("m.model.layers") for n in names)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("T", LENGTHS)
def test_dense_mode_equals_unrouted(family, T):
    loaded, routed = tiny_routed(family)
    ids, mask = batch(T)
    routed.set_routing("dense")
    with torch.no_grad():
        want = loaded.model(input_ids=ids, attention_mask=mask).logits
        got = routed(ids, mask)
    real = mask.bool()
    assert (got - want)[real].abs().max() <= ROUTED_EQUAL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["informed", "skip"])
@pytest.mark.parametrize("T", LENGTHS)
def test_sparse_equals_dense_then_blend(family, variant, T):
    _, routed = tiny_routed(family, RoutingPlan(variant=variant, lff_rank=16, n_sink=2))
    ids, mask = batch(T)
    masks = random_masks(routed, ids.shape, 0.5, seed=T)
    with torch.no_grad():
        routed.set_routing("mask", masks=masks, sparse=True)
        sparse = routed(ids, mask)
        routed.set_routing("mask", masks=masks, sparse=False)
        blend = routed(ids, mask)
        routed.set_routing("dense")
        dense = routed(ids, mask)
    real = mask.bool()
    assert (sparse - blend)[real].abs().max() <= ROUTED_EQUAL
    if T > 4:  # routing really changed something
        assert (sparse - dense)[real].abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("T", LENGTHS)
def test_kv_drop_equals_its_dense_reference(family, T):
    _, routed = tiny_routed(family, RoutingPlan(kv_policy="drop", lff_rank=16, n_sink=2))
    _, keep = tiny_routed(family, RoutingPlan(kv_policy="keep", lff_rank=16, n_sink=2))
    ids, mask = batch(T)
    masks = random_masks(routed, ids.shape, 0.5, seed=T + 1)
    with torch.no_grad():
        routed.set_routing("mask", masks=masks, sparse=True)
        sparse = routed(ids, mask)
        routed.set_routing("mask", masks=masks, sparse=False)
        blend = routed(ids, mask)
        keep.set_routing("mask", masks=masks)
        kept = keep(ids, mask)
    real = mask.bool()
    assert torch.isfinite(sparse[real]).all()
    assert (sparse - blend)[real].abs().max() <= ROUTED_EQUAL
    if T > 4:  # dropping keys is a different model
        assert (sparse - kept)[real].abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mod_layers(family):
    loaded, routed = tiny_routed(family, RoutingPlan(variant="mod", n_sink=1))
    assert list(routed.units) == ["layer0", "layer1"]
    assert all(isinstance(u, RoutedLayer) for u in routed.units.values())
    ids, mask = batch(64)
    real = mask.bool()
    with torch.no_grad():
        routed.set_routing("dense")
        assert (routed(ids, mask) - loaded.model(input_ids=ids, attention_mask=mask).logits)[real].abs().max() <= ROUTED_EQUAL
        masks = random_masks(routed, ids.shape, 0.5)
        routed.set_routing("mask", masks=masks, sparse=True)
        sparse = routed(ids, mask)
        routed.set_routing("mask", masks=masks, sparse=False)
        blend = routed(ids, mask)
        routed.set_routing("capacity", capacity=0.25)
        routed.reset_stats()
        routed(ids, mask)
    assert (sparse - blend)[real].abs().max() <= ROUTED_EQUAL
    # ceil(0.25 * 64) = 16 per row, capped by the real tokens
    assert routed.units["layer0"].executed == 32


def test_capacity_threshold_and_sinks():
    _, routed = tiny_routed("llama", RoutingPlan(n_sink=3, lff_rank=8))
    ids, mask = batch(64)
    real_tokens = int(mask.sum())
    with torch.no_grad():
        routed.set_routing("capacity", capacity=0.25)
        routed.reset_stats()
        routed(ids, mask)
        assert all(u.executed == 2 * 16 for u in routed.units.values())
        routed.set_routing("threshold")
        fractions = []
        for theta in (-100.0, 0.0, 100.0):
            for u in routed.units.values():
                u.threshold.fill_(theta)
            routed.reset_stats()
            routed(ids, mask)
            fractions.append(routed.units["layer0_mlp"].executed)
    # θ very low: everything executes; θ very high: only the 3 sinks of each row
    assert fractions[0] == real_tokens and fractions[2] == 2 * 3
    assert fractions[0] >= fractions[1] >= fractions[2]


def test_padding_never_executes():
    _, routed = tiny_routed("mistral")
    ids, mask = batch(16)
    masks = {name: torch.ones(ids.shape, dtype=torch.bool) for name in routed.units}
    routed.set_routing("mask", masks=masks)
    routed.reset_stats()
    with torch.no_grad():
        routed(ids, mask)
    assert all(u.executed == int(mask.sum()) for u in routed.units.values())


def test_train_mode_gradients():
    _, routed = tiny_routed("qwen3")
    ids, mask = batch(16)
    routed.set_routing("train", tau=2.0)
    torch.manual_seed(0)
    logits = routed(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    unit = routed.units["layer1_mlp"]
    assert unit.router.fc2.weight.grad is not None and unit.router.fc2.weight.grad.abs().sum() > 0
    assert unit.forecaster.w2.weight.grad.abs().sum() > 0
    assert 0 < unit.execute_fraction < 1


def test_mask_mode_needs_a_mask():
    _, routed = tiny_routed("llama")
    ids, mask = batch(8)
    routed.set_routing("mask", masks={})
    with pytest.raises(ValueError, match="mask mode needs forced_mask of shape"):
        routed(ids, mask)
    with pytest.raises(ValueError, match="mode must be one of"):
        routed.set_routing("sometimes")


def test_plan_selects_units():
    _, routed = tiny_routed("llama", RoutingPlan(kinds=("mlp",), layers=(1,)))
    assert list(routed.units) == ["layer1_mlp"]
    from irc.errors import UserError

    with pytest.raises(UserError, match="names layers \\[5\\]"):
        tiny_routed("llama", RoutingPlan(layers=(5,)))
