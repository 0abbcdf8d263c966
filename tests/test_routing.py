"""(e) save → load round-trips to identical outputs; a changed base is refused."""

import json

import pytest
import torch
from routed_helpers import batch, randomize_routing

import irc
from irc.errors import UserError
from irc.plan import RoutingPlan

from tiny import save_tiny


@pytest.fixture
def base_dir(tmp_path):
    return save_tiny("qwen2", tmp_path / "base")


@pytest.mark.parametrize("variant", ["informed", "skip", "mod"])
def test_save_load_round_trip(base_dir, tmp_path, variant):
    routed = irc.route(irc.load_model(str(base_dir), dtype="fp32"), RoutingPlan(variant=variant, lff_rank=8, n_sink=1))
    randomize_routing(routed, seed=3)
    for unit in routed.units.values():
        unit.threshold.fill_(0.25)
    ids, mask = batch(24)
    routed.set_routing("threshold")
    with torch.no_grad():
        want = routed(ids, mask)
    out = routed.save(tmp_path / "routed")
    manifest = json.loads((out / "irc.json").read_text())
    assert manifest["format_version"] == 1 and manifest["plan"]["variant"] == variant
    assert manifest["base"]["weights_sha256"] == routed.base.weights_sha256
    assert len(manifest["units"]) == len(routed.units)
    again = irc.load(out)
    again.set_routing("threshold")
    with torch.no_grad():
        got = again(ids, mask)
    assert torch.equal(got[mask.bool()], want[mask.bool()])
    assert all(float(u.threshold) == 0.25 for u in again.units.values())


def test_changed_base_is_refused(base_dir, tmp_path):
    routed = irc.route(irc.load_model(str(base_dir), dtype="fp32"), RoutingPlan(lff_rank=8))
    out = routed.save(tmp_path / "routed")
    save_tiny("qwen2", base_dir, seed=1)  # different weights, same place
    with pytest.raises(UserError, match="is not the one .* was built on"):
        irc.load(out)


def test_save_refuses_to_overwrite_and_leaves_nothing_half_written(base_dir, tmp_path):
    routed = irc.route(irc.load_model(str(base_dir), dtype="fp32"), RoutingPlan(lff_rank=8))
    out = routed.save(tmp_path / "routed")
    with pytest.raises(UserError, match="already exists"):
        routed.save(out)
    routed.save(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "routed"]


def test_not_a_routed_dir(tmp_path):
    with pytest.raises(UserError, match="not a routed model directory"):
        irc.load(tmp_path)
