"""``fold_routed``: folding a trained model from held-in fractions, then recalibrating to its budget."""

import pytest
import torch
from routed_helpers import tiny_routed

from irc.eval.routed import routed_budget
from irc.plan import RoutingPlan
from irc.train.fold import fold_routed, held_in_fractions, route_savings


def _windows(routed, n=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, routed.base.model.config.vocab_size, (n, T), generator=g)


def test_min_saving_folds_the_cheapest_routes_plain_and_the_budget_still_holds():
    _, routed = tiny_routed("qwen3", RoutingPlan(lff_rank=8, n_sink=2), seed=2)  # every unit's route dynamic
    routed.set_routing("threshold")
    windows = _windows(routed)
    fractions = held_in_fractions(routed, windows)
    savings = route_savings(routed, fractions, windows.shape[1])
    dynamic = {n: s for n, s in savings.items() if 0.05 < fractions[n] < 0.95}
    assert len(dynamic) == 4, fractions
    floor = sorted(dynamic.values())[1] + 1e-12  # the two cheapest dynamic routes fall under it
    budget = lambda r: routed_budget(r, flops_saved=0.1, seq_len=windows.shape[1])  # noqa: E731

    record = fold_routed(routed, windows, 0.05, min_saving=floor, budget=budget, show_progress=False)

    cheapest = sorted(dynamic, key=dynamic.get)[:2]
    assert record["folded_for_saving"] == sorted(cheapest)
    assert all(record["folded"][n] == "plain" for n in cheapest)
    assert record["min_saving"] == floor
    assert record["saving_given_up"] == pytest.approx(sum(dynamic[n] for n in cheapest), abs=1e-6)
    assert not set(cheapest) & set(routed.units)  # they lost their routers
    assert record["routers_after"] == record["routers_before"] - len(record["folded"])
    # the routes that remain were recalibrated to the model's budget
    assert record["recalibration"]["achieved_flops_saved"] == pytest.approx(0.1, abs=0.02)


def test_without_min_saving_the_record_is_as_before():
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=8, n_sink=2))
    routed.set_routing("threshold")
    record = fold_routed(routed, _windows(routed), 0.05, show_progress=False)
    assert "min_saving" not in record and "folded_for_saving" not in record
