"""Compute budgets: FLOP-weighted execute fractions that meet a FLOP target exactly."""

import pytest
import torch

from irc.eval.flops import (
    affine_cost,
    flops_budget,
    folded_unit_flops,
    model_flops,
    route_saving,
    sparsity_budget,
)
from irc.models.arch import Architecture
from irc.plan import RoutingPlan
from irc.train.losses import routing_terms

SMOL = Architecture(family="llama", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64,
                    intermediate=1536, vocab=49152, tied_embeddings=True, max_positions=8192)
PLAN = RoutingPlan(lff_rank=100)
DYNAMIC = {f"layer{i}_{k}": k for i in range(30) for k in ("attn", "mlp")}


def _saved(fractions: dict[str, float], folded=None, seq_len=1024) -> float:
    folded = folded or {}
    dense = SMOL.dense_flops_per_token(seq_len)
    routed = SMOL.head_flops()
    for name, kind in DYNAMIC.items():
        if name in folded:
            routed += folded_unit_flops(SMOL, PLAN, kind, folded[name][1], seq_len)
        else:
            fixed, swing = affine_cost(SMOL, PLAN, kind, seq_len)
            routed += fixed + fractions[name] * swing
    return 1 - routed / dense


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3, 0.4])
def test_meeting_the_weighted_target_saves_exactly_the_flops(target):
    b = flops_budget(SMOL, PLAN, 1024, target, DYNAMIC)
    assert sum(b.weights.values()) == pytest.approx(1.0)
    # any fractions that meet Σ w·e = target save the same FLOPs: uniform, or all in the MLPs
    uniform = {n: b.target for n in DYNAMIC}
    assert _saved(uniform) == pytest.approx(target, abs=1e-9)
    w_mlp = sum(w for n, w in b.weights.items() if n.endswith("mlp"))
    e_mlp = (b.target - (1 - w_mlp)) / w_mlp  # attention all executing, MLPs take the whole saving
    mlp_only = {n: (e_mlp if n.endswith("mlp") else 1.0) for n in DYNAMIC}
    assert _saved(mlp_only) == pytest.approx(target, abs=1e-9)


def test_weights_are_proportional_to_what_execution_costs():
    b = flops_budget(SMOL, PLAN, 512, 0.2, DYNAMIC)
    ratio = b.weights["layer3_mlp"] / b.weights["layer3_attn"]
    (_, swing_mlp), (_, swing_attn) = affine_cost(SMOL, PLAN, "mlp", 512), affine_cost(SMOL, PLAN, "attn", 512)
    assert ratio == pytest.approx(swing_mlp / swing_attn)
    assert ratio > 1.5  # an MLP costs more than an attention query path on SmolLM2 at T=512


def test_folded_units_are_fixed_costs():
    folded = {"layer0_mlp": ("mlp", "forecast"), "layer1_attn": ("attn", "plain")}
    dynamic = {n: k for n, k in DYNAMIC.items() if n not in folded}
    b = flops_budget(SMOL, PLAN, 1024, 0.25, dynamic, folded)
    assert set(b.weights) == set(dynamic)
    assert _saved({n: b.target for n in dynamic}, folded) == pytest.approx(0.25, abs=1e-9)


def test_out_of_reach_targets_say_so():
    from irc.errors import UserError

    with pytest.raises(UserError, match="out of reach"):
        flops_budget(SMOL, PLAN, 1024, 0.95, DYNAMIC)


def test_unit_sparsity_is_the_equal_weight_budget():
    b = sparsity_budget(0.25, DYNAMIC)
    assert set(b.weights.values()) == {1 / 60} and b.target == pytest.approx(0.75)
    # same as model_flops's nominal count
    dense, routed = model_flops(SMOL, PLAN, 1024, 0.75)
    assert _saved({n: 0.75 for n in DYNAMIC}) == pytest.approx(1 - routed / dense)


class _Unit:
    def __init__(self, gate, real):
        self.last_gate = (gate, real)
        self.last_cosreg = torch.zeros(())


def test_the_weighted_execute_fraction_sends_gradient_in_proportion_to_cost():
    b = flops_budget(SMOL, PLAN, 512, 0.01, {"layer0_attn": "attn", "layer0_mlp": "mlp"})
    gates = [torch.rand(2, 16, requires_grad=True) for _ in range(2)]
    real = torch.ones(2, 16)
    units = [_Unit(g, real) for g in gates]
    e_bar, _ = routing_terms(units, [b.weights["layer0_attn"], b.weights["layer0_mlp"]])
    (b.target - e_bar).abs().backward()
    g_attn, g_mlp = (g.grad.abs().mean() for g in gates)
    assert float(g_mlp / g_attn) == pytest.approx(b.weights["layer0_mlp"] / b.weights["layer0_attn"], rel=1e-5)
    # unit sparsity: equal gradients
    gates = [torch.rand(2, 16, requires_grad=True) for _ in range(2)]
    e_bar, _ = routing_terms([_Unit(g, real) for g in gates])
    e_bar.backward()
    assert torch.allclose(gates[0].grad, gates[1].grad)


@pytest.mark.parametrize("kind,execute", [("attn", 0.85), ("mlp", 0.4), ("mlp", 1.0)])
def test_route_saving_is_what_folding_the_unit_plain_gives_up(kind, execute):
    """Folding one unit plain (it runs on every token, no router, no forecaster) moves the model's
    FLOPs saved by exactly that unit's route saving; at execute 1 the saving is minus its router."""
    fractions = {name: 0.7 for name in DYNAMIC}
    name = f"layer3_{kind}"
    fractions[name] = execute
    before = _saved(fractions)
    after = _saved(fractions, folded={name: (kind, "plain")})
    saving = route_saving(SMOL, PLAN, kind, 1024, execute)
    assert before - after == pytest.approx(saving, rel=1e-9)
    if execute == 1.0:
        router = 2 * (576 * PLAN.router_width(576) + PLAN.router_width(576) * 2)
        assert saving == pytest.approx(-router / SMOL.dense_flops_per_token(1024))
