"""A snapshot of each tiny family's rewritten graph: op counts per routed unit.

A refactor that changes the rewritten graph changes these counts and shows up in
review. After an intended change, regenerate with
``IRC_UPDATE_SNAPSHOTS=1 pytest tests/passes/test_snapshot.py`` and commit the diff.
"""

import json
import os
from pathlib import Path

import pytest
from routed_helpers import tiny_routed

from irc.inspect.summary import graph_snapshot

from tiny import FAMILIES

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.mark.parametrize("family", FAMILIES)
def test_rewritten_graph_matches_snapshot(family):
    _, routed = tiny_routed(family)
    got = graph_snapshot(routed)
    path = SNAPSHOTS / f"{family}.json"
    if os.environ.get("IRC_UPDATE_SNAPSHOTS") == "1":
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert path.is_file(), f"no snapshot for {family}; run with IRC_UPDATE_SNAPSHOTS=1"
    want = json.loads(path.read_text())
    assert got == want


def test_snapshot_shape():
    _, routed = tiny_routed("qwen3")
    snap = graph_snapshot(routed)
    attn = snap["units"]["layer0_attn"]
    assert set(attn) == {"norm", "body", "kv", "query"}
    # the query path holds the attention and o_proj; the kv path none of it
    assert attn["query"]["scaled_dot_product_attention.default"] == 1
    assert "scaled_dot_product_attention.default" not in attn["kv"]
    assert attn["kv"]["linear.default"] == 2 and attn["query"]["linear.default"] == 2
    assert snap["top"]["call_module"] == 4
