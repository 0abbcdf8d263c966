"""The folding pass on tiny models: folded units against the routed units they replace.

(a) a unit whose threshold makes it approximate (θ = +1e9) or execute (θ = −1e9)
    every token computes what its fold (forecast / plain) computes: whole logits equal,
    with left padding, an odd length, T < n_sink and rows with fewer real tokens than
    n_sink; a fold that flips some decisions changes only the tokens it flipped;
(b) a forecast-folded attention unit runs keys, values and queries on the sink slots
    only, a forecast-folded MLP runs its body on them only;
(c) save → load re-applies the fold and gives identical logits;
(f) a snapshot of the op counts of folded units, as traced by ``torch.export``.

ONNX export of folded models: tests/exporters/test_onnx_folded.py; decoding:
tests/generation/test_folded_decode.py.
"""

import copy
import dataclasses
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from routed_helpers import batch, randomize_routing, tiny_routed

import irc
from irc.errors import UserError
from irc.inspect.summary import graph_snapshot, unit_table
from irc.nn.folded_unit import FoldedUnit
from irc.nn.routed_unit import RoutedUnit
from irc.nn.tokens import sink_mask
from irc.passes.fold_static_routes import choose_folds, fold_static_routes
from irc.plan import RoutingPlan

from tiny import FAMILIES, save_tiny
from tolerances import ROUTED_EQUAL

SNAPSHOTS = Path(__file__).parent / "snapshots"
# a mix: each kind folded both ways across the two layers
FOLDS = {"layer0_attn": "forecast", "layer0_mlp": "plain", "layer1_attn": "plain", "layer1_mlp": "forecast"}
THETA = {"forecast": 1e9, "plain": -1e9}  # the thresholds that make a routed unit's route constant


def _inputs(T: int, n_sink: int):
    """Row 0 full, row 1 left-padded, row 2 with fewer real tokens than n_sink, row 3 padded on both sides."""
    ids, _ = batch(T, B=4)
    mask = torch.ones(4, T, dtype=torch.long)
    mask[1, : T // 2] = 0
    mask[2, : max(T - max(n_sink - 1, 1), 0)] = 0
    if T >= 4:
        mask[3, 0] = mask[3, -1] = 0
    return ids, mask


def _fold_copy(routed, folds):
    folded = dataclasses.replace(routed, gm=copy.deepcopy(routed.gm), passes=list(routed.passes))
    folded.fold(folds)
    return folded


def _constant(routed, folds):
    for name, how in folds.items():
        routed.units[name].threshold.fill_(THETA[how])


@pytest.mark.parametrize("family,n_sink", [(f, 2) for f in FAMILIES] + [("llama", 4), ("qwen3", 0)])
def test_fold_equals_constant_routes(family, n_sink):
    _, routed = tiny_routed(family, RoutingPlan(lff_rank=16, n_sink=n_sink))
    _constant(routed, FOLDS)
    folded = _fold_copy(routed, FOLDS)
    assert folded.units == {} and list(folded.folded) == list(FOLDS)
    assert all(isinstance(u, FoldedUnit) and u.how == FOLDS[n] for n, u in folded.folded.items())
    assert folded.plan.folded == tuple(FOLDS.items())
    routed.set_routing("threshold")
    folded.set_routing("threshold")
    for T in (1, 3, 7, 64):
        ids, mask = _inputs(T, n_sink)
        with torch.no_grad():
            want = routed(ids, mask)
            got = folded(ids, mask)
        real = mask.bool()
        assert not got[real].isnan().any()
        assert (got - want)[real].abs().max() <= ROUTED_EQUAL, T


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_folded_and_dynamic_units_together(family):
    """Half the units folded, half still routing per token with real decisions."""
    _, routed = tiny_routed(family)
    folds = {"layer0_mlp": "forecast", "layer1_attn": "forecast"}
    _constant(routed, folds)
    folded = _fold_copy(routed, folds)
    assert list(folded.units) == ["layer0_attn", "layer1_mlp"]
    routed.set_routing("threshold")
    folded.set_routing("threshold")
    for T in (7, 64):
        ids, mask = _inputs(T, routed.plan.n_sink)
        with torch.no_grad():
            want = routed(ids, mask)
            got = folded(ids, mask)
        assert (got - want)[mask.bool()].abs().max() <= ROUTED_EQUAL
    fractions = folded.execute_fractions()
    assert set(fractions) == {"layer0_attn", "layer1_mlp"} and 0 < min(fractions.values()) < 1


def _decisions(routed, name, ids, mask) -> torch.Tensor:
    """The threshold-mode execute decisions ``[B, T]`` of unit ``name`` on this input."""
    unit = routed.units[name]
    seen = {}

    def hook(module, args):
        x, attention_mask = args[:2]
        pad = attention_mask.bool()
        logits = module.router(module.norm(x))
        seen["execute"] = module._decide(logits, pad, sink_mask(pad, module.n_sink))

    handle = unit.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            routed(ids, mask)
    finally:
        handle.remove()
    return seen["execute"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fold_changes_only_the_tokens_it_flips(family):
    """Folds of the last layer's units: a token's logits depend on its own decisions there only
    (attention reads every token's keys and values, which no decision changes), so the tokens
    whose decisions the fold keeps are equal and the others are not."""
    _, routed = tiny_routed(family)
    routed.set_routing("threshold")
    ids, mask = _inputs(64, routed.plan.n_sink)
    attn = _decisions(routed, "layer1_attn", ids, mask)
    mlp = _decisions(routed, "layer1_mlp", ids, mask)
    folded = _fold_copy(routed, {"layer1_attn": "forecast", "layer1_mlp": "plain"})
    folded.set_routing("threshold")
    with torch.no_grad():
        want = routed(ids, mask)
        got = folded(ids, mask)
    pad = mask.bool()
    sinks = sink_mask(pad, routed.plan.n_sink)
    kept = pad & (~attn | sinks) & mlp  # forecast keeps approximated tokens, plain keeps executed ones
    flipped = pad & ~kept
    assert kept.sum() > 4 and flipped.sum() > 4  # the routers route both ways: not vacuous
    diff = (got - want).abs().amax(-1)  # [B, T]
    assert diff[kept].max() <= ROUTED_EQUAL
    assert (diff[flipped] > 1e-3).all()


def _record_inputs(module, into: list):
    return module.register_forward_hook(lambda m, args, out: into.append(tuple(args[0].shape)))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_forecast_attention_runs_the_sinks_only(family):
    _, routed = tiny_routed(family, RoutingPlan(lff_rank=16, n_sink=4))
    folded = _fold_copy(routed, FOLDS)
    attn, mlp, plain = folded.folded["layer0_attn"], folded.folded["layer1_mlp"], folded.folded["layer0_mlp"]
    assert plain.forecaster is None and plain.router is None and attn.router is None
    seen = {"kv": [], "query": [], "attn_body": [], "mlp_body": [], "plain_body": []}
    hooks = [_record_inputs(attn.kv, seen["kv"]), _record_inputs(attn.query, seen["query"]),
             _record_inputs(attn.body, seen["attn_body"]), _record_inputs(mlp.body, seen["mlp_body"]),
             _record_inputs(plain.body, seen["plain_body"])]
    try:
        for T in (3, 64):
            ids, mask = _inputs(T, 4)
            with torch.no_grad():
                folded(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    D = routed.arch.hidden
    # keys, values and queries of the S = min(n_sink, T) sink slots per row, nothing else
    assert seen["kv"] == seen["query"] == seen["mlp_body"] == [(4, 3, D), (4, 4, D)]
    assert seen["attn_body"] == []
    assert seen["plain_body"] == [(4, 3, D), (4, 64, D)]


def test_counters_count_sinks_as_executed():
    _, routed = tiny_routed("llama")
    folded = _fold_copy(routed, FOLDS)
    folded.set_routing("threshold", record=True)
    folded.reset_stats()
    ids, mask = _inputs(7, 2)
    with torch.no_grad():
        folded(ids, mask)
    real = int(mask.sum())
    sinks = int(sink_mask(mask.bool(), 2).sum())
    for name, unit in folded.folded.items():
        assert unit.tokens == real
        assert unit.executed == (real if FOLDS[name] == "plain" else sinks)
    folded.set_routing("dense")  # a folded unit keeps its route whatever the mode
    assert all(u.mode == "folded" for u in folded.folded.values())
    with pytest.raises(ValueError, match="mode must be one of"):
        folded.set_routing("sideways")


def test_pass_result_and_refusals():
    _, routed = tiny_routed("llama")
    gm = routed.gm
    code = {n.name: (n.op, n.target, n.args) for n in gm.graph.nodes}
    before = gm.layer0_attn
    result = fold_static_routes(gm, {"layer0_attn": "forecast"})
    after = gm.layer0_attn  # the same parts and forecaster: the same weights
    assert all(getattr(after, p) is getattr(before, p) for p in ("norm", "body", "kv", "query", "forecaster"))
    assert result.modified and result.stats == {"folded": {"layer0_attn": "forecast"}, "forecast": 1, "plain": 0}
    # the graph keeps its nodes: the call reaches another module
    assert {n.name: (n.op, n.target, n.args) for n in gm.graph.nodes} == code
    assert isinstance(gm.layer0_attn, FoldedUnit) and isinstance(gm.layer0_mlp, RoutedUnit)
    again = fold_static_routes(gm, {"layer0_attn": "forecast"})
    assert not again.modified
    with pytest.raises(UserError, match="already folded to 'forecast'"):
        fold_static_routes(gm, {"layer0_attn": "plain"})
    with pytest.raises(UserError, match="no routed unit 'layer9_mlp'"):
        fold_static_routes(gm, {"layer9_mlp": "plain"})
    with pytest.raises(UserError, match="folds to one of"):
        fold_static_routes(gm, {"layer0_mlp": "skip"})


def test_choose_folds():
    fractions = {"a": 0.0, "b": 0.04, "c": 0.5, "d": 0.96, "e": 1.0, "f": None}
    assert choose_folds(fractions, 0.05) == {"a": "forecast", "b": "forecast", "d": "plain", "e": "plain"}
    assert choose_folds(fractions, 0.0) == {"a": "forecast", "e": "plain"}
    with pytest.raises(ValueError, match="epsilon"):
        choose_folds(fractions, 0.5)


def test_choose_folds_folds_routes_that_save_too_little_plain():
    fractions = {"a": 0.02, "b": 0.5, "c": 0.9, "d": 0.3, "e": None}
    savings = {"a": 0.0001, "b": 0.004, "c": 0.0008, "d": 0.006, "e": 0.0}
    # ε first (a forecasts, however little it saves), then the routes under the floor run every token
    assert choose_folds(fractions, 0.05, savings=savings, min_saving=0.002) == {"a": "forecast", "c": "plain"}
    assert choose_folds(fractions, 0.05, savings=savings, min_saving=0.005) == {"a": "forecast", "b": "plain",
                                                                               "c": "plain"}
    assert choose_folds(fractions, 0.05, savings=savings) == {"a": "forecast"}  # min_saving 0: off
    with pytest.raises(ValueError, match="min_saving"):
        choose_folds(fractions, 0.05, savings=savings, min_saving=1.0)


def test_plan_folded_validates_and_round_trips():
    plan = RoutingPlan(folded={"layer1_mlp": "plain", "layer0_attn": "forecast"})
    assert plan.folded == (("layer0_attn", "forecast"), ("layer1_mlp", "plain"))  # graph order
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["folded"] == {"layer0_attn": "forecast", "layer1_mlp": "plain"}
    assert RoutingPlan.from_dict(d) == plan and RoutingPlan.from_dict({}).folded == ()
    for bad, message in [({"layer0_attn": "sometimes"}, "folds to one of"), ({"attn0": "plain"}, "names look like"),
                         ([("layer0_mlp", "plain"), ("layer0_mlp", "forecast")], "twice")]:
        with pytest.raises(ValueError, match=message):
            RoutingPlan(folded=bad)
    with pytest.raises(ValueError, match="not one this plan routes"):
        RoutingPlan(kinds=("mlp",), folded={"layer0_attn": "plain"})
    with pytest.raises(ValueError, match="per-unit routing"):
        RoutingPlan(variant="mod", folded={"layer0_attn": "plain"})


def test_skip_variant_folds_to_the_identity():
    _, routed = tiny_routed("qwen2", RoutingPlan(variant="skip", lff_rank=16, n_sink=2))
    _constant(routed, FOLDS)
    folded = _fold_copy(routed, FOLDS)
    routed.set_routing("threshold")
    ids, mask = _inputs(7, 2)
    with torch.no_grad():
        assert (folded(ids, mask) - routed(ids, mask))[mask.bool()].abs().max() <= ROUTED_EQUAL


def test_save_load_round_trip(tmp_path):
    base = save_tiny("qwen2", tmp_path / "base")
    routed = irc.route(irc.load_model(str(base), dtype="fp32"), RoutingPlan(lff_rank=8, n_sink=2, lora_rank=4))
    randomize_routing(routed, seed=5)
    with torch.no_grad():  # LoRA deltas that change something, so that losing them would show
        for unit in routed.units.values():
            for p in unit.lora.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    routed.fold({"layer0_attn": "forecast", "layer1_mlp": "plain"})
    for unit in routed.units.values():
        unit.threshold.fill_(0.1)
    routed.set_routing("threshold")
    ids, mask = _inputs(24, 2)
    with torch.no_grad():
        want = routed(ids, mask)
    assert any(k.startswith("layer0_attn.lora.") for k in routed.routing_state())
    assert "layer0_attn.threshold" not in routed.routing_state()
    out = routed.save(tmp_path / "routed")
    manifest = json.loads((out / "irc.json").read_text())
    assert manifest["plan"]["folded"] == {"layer0_attn": "forecast", "layer1_mlp": "plain"}
    rows = {r["name"]: r for r in manifest["units"]}
    assert list(rows) == ["layer0_attn", "layer0_mlp", "layer1_attn", "layer1_mlp"]
    assert rows["layer0_attn"]["folded"] == "forecast" and rows["layer0_attn"]["router_width"] is None
    assert "folded" not in rows["layer0_mlp"]
    again = irc.load(out)
    assert list(again.folded) == ["layer0_attn", "layer1_mlp"] and list(again.units) == ["layer0_mlp", "layer1_attn"]
    assert [p["pass"] for p in again.passes][-1] == "fold_static_routes"
    again.set_routing("threshold")
    with torch.no_grad():
        got = again(ids, mask)
    assert torch.equal(got[mask.bool()], want[mask.bool()])


def test_unit_table_shows_folded_units():
    _, routed = tiny_routed("llama")
    folded = _fold_copy(routed, FOLDS)
    folded.records = {"fold": {"held_in_execute": {"layer0_attn": 0.01}}}
    rows = {r.name: r for r in unit_table(folded, 0.25, 64)}
    assert rows["layer0_attn"].folded == "forecast" and not rows["layer0_attn"].routed
    assert rows["layer0_attn"].router_params == 0 and rows["layer0_attn"].lff_params > 0
    assert rows["layer0_attn"].held_in_execute == 0.01
    assert rows["layer0_mlp"].folded == "plain" and rows["layer0_mlp"].lff_params == 0
    assert rows["layer0_mlp"].routed_flops == rows["layer0_mlp"].dense_flops
    assert rows["layer0_attn"].routed_flops < 0.2 * rows["layer0_attn"].dense_flops


def _traced_unit_ops(routed) -> dict[str, dict[str, int]]:
    """Op counts per unit of the model as ``torch.export`` traces it (ONNX export's view)."""
    from torch.export import Dim

    from irc.exporters.onnx import _Logits

    routed.set_routing("threshold", record=False)
    ids, mask = batch(16)
    seq, rows = Dim("seq", min=1, max=512), Dim("batch", min=1, max=8)
    with torch.no_grad():
        ep = torch.export.export(_Logits(routed.gm), (ids, mask), strict=False,
                                 dynamic_shapes={"input_ids": {0: rows, 1: seq}, "attention_mask": {0: rows, 1: seq}},
                                 prefer_deferred_runtime_asserts_over_guards=True)
    counts: dict[str, Counter] = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        owners = [path for path, _ in stack.values() if path.startswith("gm.layer")]
        name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and owners and "assert" not in name:
            counts.setdefault(owners[0].split(".")[1], Counter())[name] += 1
    return {unit: dict(sorted(c.items())) for unit, c in counts.items()}


def test_folded_units_match_snapshot():
    """Op counts of the four folded units of tiny llama, as exported (update: IRC_UPDATE_SNAPSHOTS=1)."""
    _, routed = tiny_routed("llama")
    folded = _fold_copy(routed, FOLDS)
    got = {"parts": graph_snapshot(folded)["folded"], "traced": _traced_unit_ops(folded)}
    path = SNAPSHOTS / "folded-llama.json"
    if os.environ.get("IRC_UPDATE_SNAPSHOTS") == "1":
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert path.is_file(), "no snapshot for folded llama; run with IRC_UPDATE_SNAPSHOTS=1"
    assert got == json.loads(path.read_text())
    traced = got["traced"]
    # no router, no data-dependent count (nonzero / item) in any folded unit
    assert not any(op in ops for ops in traced.values() for op in ("relu.default", "nonzero.default", "item.default"))
    # forecast attention: k, v, q, o and the forecaster's two; one attention over the sink slots
    assert traced["layer0_attn"]["linear.default"] == 6 and traced["layer0_attn"]["scaled_dot_product_attention.default"] == 1
    assert traced["layer1_attn"]["linear.default"] == 4  # plain attention: the unit as captured
    assert traced["layer0_mlp"]["linear.default"] == 3 and "sort.stable" not in traced["layer0_mlp"]
    assert traced["layer1_mlp"]["linear.default"] == 5 and "token_scatter.default" in traced["layer1_mlp"]
