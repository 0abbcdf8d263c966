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


def _lora_params(units):
    return {f"{n}.{k}": p.detach().clone() for n, u in units.items() if getattr(u, "lora", None) is not None
            for k, p in u.lora.named_parameters()}


def test_refine_trains_the_folded_models_lora_and_recalibrates():
    """After a fold, ``refine_folded`` trains every LoRA delta, the folded units' included (they are
    no longer in ``routed.units``), lowers the training loss on its windows, keeps the routers, and
    recalibrates the remaining routes to the budget."""
    from irc.train.fold import refine_folded
    from irc.train.lora_train import LoRATrainConfig
    from irc.train.losses import lm_loss

    _, routed = tiny_routed("qwen3", RoutingPlan(lff_rank=8, n_sink=2, lora_rank=4), seed=2)
    routed.set_routing("threshold")
    windows = _windows(routed)
    budget = lambda r: routed_budget(r, flops_saved=0.1, seq_len=windows.shape[1])  # noqa: E731
    fold_routed(routed, windows, 0.05, min_saving=0.999, budget=budget, show_progress=False)  # every route plain
    assert not routed.units and len(routed.folded) == 4
    train = _windows(routed, n=2, seed=1)
    before = _lora_params(routed.folded)
    routers = {n: p.clone() for n, p in routed.gm.named_parameters() if ".router." in n}

    def loss():
        with torch.no_grad():
            routed.set_routing("threshold", record=False)
            return float(lm_loss(routed(train), train, torch.ones_like(train)))

    start = loss()
    record = refine_folded(routed, train, LoRATrainConfig(steps=6, batch_size=2, lr=1e-2, routing="threshold"),
                           calib=windows, budget=budget, show_progress=False)
    after = _lora_params(routed.folded)
    assert before.keys() == after.keys() and any(k.endswith("B") for k in after)
    assert all(not torch.equal(before[k], after[k]) for k in after if k.endswith("B"))  # every delta moved
    assert loss() < start
    assert record["lora"]["steps"] == 6 and "recalibration" not in record  # no route left to calibrate
    assert all(torch.equal(p, routers[n]) for n, p in routed.gm.named_parameters() if n in routers)


def test_refine_recalibrates_the_routes_that_stay():
    from irc.train.fold import refine_folded
    from irc.train.lora_train import LoRATrainConfig

    _, routed = tiny_routed("qwen3", RoutingPlan(lff_rank=8, n_sink=2, lora_rank=4), seed=2)
    routed.set_routing("threshold")
    windows = _windows(routed)
    budget = lambda r: routed_budget(r, flops_saved=0.1, seq_len=windows.shape[1])  # noqa: E731
    fractions = held_in_fractions(routed, windows)
    cheapest = sorted(route_savings(routed, fractions, windows.shape[1]).values())[1] + 1e-12
    fold_routed(routed, windows, 0.05, min_saving=cheapest, budget=budget, show_progress=False)
    assert 0 < len(routed.units) < 4
    record = refine_folded(routed, _windows(routed, n=2, seed=1),
                           LoRATrainConfig(steps=3, batch_size=2, lr=1e-2, routing="threshold"),
                           calib=windows, budget=budget, show_progress=False)
    assert record["recalibration"]["achieved_flops_saved"] == pytest.approx(0.1, abs=0.02)


def test_refine_needs_lora():
    from irc.errors import UserError
    from irc.train.fold import refine_folded
    from irc.train.lora_train import LoRATrainConfig

    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=8, n_sink=2))
    with pytest.raises(UserError, match="has none"):
        refine_folded(routed, _windows(routed), LoRATrainConfig(steps=1, routing="threshold"),
                      calib=_windows(routed), show_progress=False)
