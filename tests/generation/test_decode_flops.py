"""FLOPs per decoded token: folded units cost what they run, not the dense unit."""

import pytest
from routed_helpers import tiny_routed

from irc.eval.flops import forecaster_flops
from irc.generation.stats import decode_flops
from irc.plan import RoutingPlan


def test_folded_units_cost_what_they_run():
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=4))
    arch, C = routed.arch, 20.0
    unfolded = decode_flops(arch, routed.plan, {name: None for name in routed.units}, C)
    routed.fold({"layer0_attn": "forecast", "layer1_mlp": "plain"})
    folded = decode_flops(arch, routed.plan, {name: None for name in routed.units}, C)
    assert folded["dense"] == unfolded["dense"]
    # fractions None count as executing: the unfolded model pays routers on top of every dense unit
    attn = arch.attention_kv_flops() + arch.attention_query_flops(C)
    router = (unfolded["routed"] - unfolded["dense"]) / 4  # four routed units, one router each
    want = unfolded["routed"] - (attn + router) + forecaster_flops(arch.hidden, 16) - router
    assert folded["routed"] == pytest.approx(want)
    assert folded["routed"] < unfolded["dense"] + 2 * router
