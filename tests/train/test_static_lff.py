"""The static forecaster baseline: units chosen by loss increase per FLOP saved, to a FLOP target."""

import math

import pytest
import torch
from routed_helpers import tiny_routed

from irc.eval.flops import folded_unit_flops
from irc.plan import RoutingPlan
from irc.train.lff_fit import fit_closed_form
from irc.train.static_lff import select_static_units


def _windows(n, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, T), generator=g)


@pytest.mark.parametrize("target", [0.05, 0.3])
def test_selection_meets_the_target_in_order_of_cost_per_flop(target):
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=2), randomize=False)
    w = _windows(12)
    fit_closed_form(routed, w[:8], show_progress=False)
    record = select_static_units(routed, w[8:10], target, seq_len=64, show_progress=False)
    units = record["units"]
    chosen = record["chosen"]
    ratio = {n: u["loss_increase"] / u["flops_saved"] for n, u in units.items()}
    # greedy: every chosen unit costs at most what any unchosen one would per FLOP saved
    rest = [n for n in units if n not in chosen]
    assert chosen and all(ratio[c] <= ratio[r] + 1e-9 for c in chosen for r in rest)
    # just enough: the target is met, and dropping the last choice would miss it
    saved = sum(units[n]["flops_saved"] for n in chosen)
    assert saved >= target - 1e-4 and saved - units[chosen[-1]]["flops_saved"] < target
    assert record["flops_saved_by_choice"] == pytest.approx(saved, abs=1e-4)
    # thresholds express the choice; in threshold mode a chosen unit executes its sinks only
    routed.set_routing("threshold", record=True)
    routed.reset_stats()
    routed(w[10:12])
    for name, unit in routed.units.items():
        assert math.isinf(float(unit.threshold))
        expected = 2 * 2 if name in chosen else 2 * 64  # 2 rows × n_sink, or every token
        assert unit.executed == expected, name


def test_each_unit_is_scored_by_its_own_loss_increase():
    _, routed = tiny_routed("qwen2", RoutingPlan(lff_rank=16, n_sink=2), randomize=False)
    w = _windows(10)
    fit_closed_form(routed, w[:8], show_progress=False)
    record = select_static_units(routed, w[8:10], 0.1, seq_len=64, show_progress=False)
    arch, plan = routed.arch, routed.plan
    dense = arch.dense_flops_per_token(64)
    for name, u in routed.units.items():
        saved = (arch.unit_flops(u.kind, 64) - folded_unit_flops(arch, plan, u.kind, "forecast", 64)) / dense
        assert record["units"][name]["flops_saved"] == pytest.approx(saved, abs=1e-5)
