"""ONNX decode export (past/present KV, portable profile) on tiny models, against PyTorch.

ONNX Runtime generation equals PyTorch generation token for token (greedy), for
threshold routing (the file routes behind If nodes, PyTorch through the sparse
path: the same decisions) and dense; the export verifies this itself. The
branches themselves: test_onnx_decode_branches.py.
"""

import json
from dataclasses import replace

import onnx
import pytest
import torch
from routed_helpers import tiny_routed

from irc.errors import UserError
from irc.exporters.onnx_decode import FILE, OnnxDecodeConfig, OrtDecoder, export_decode
from irc.generation import GenerationConfig, generate, left_pad
from irc.plan import RoutingPlan

GREEDY = GenerationConfig(max_new_tokens=10, stop_at_eos=False)


@pytest.mark.parametrize("family, routing", [("llama", "threshold"), ("qwen3", "dense"), ("qwen2", "dense")])
def test_ort_generation_equals_pytorch(family, routing, tmp_path):
    _, routed = tiny_routed(family)
    routed.set_routing(routing)
    manifest = export_decode(routed, tmp_path, OnnxDecodeConfig(routing=routing), log=lambda _: None)
    assert manifest["verification"]["passed"] and manifest["verification"]["tokens_equal"]
    model = onnx.load(str(tmp_path / FILE), load_external_data=False)
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "past.0.key"]
    assert [o.name for o in model.graph.output][:2] == ["logits", "present.0.key"]
    assert json.loads((tmp_path / f"{FILE}.json").read_text())["routing"] == routing
    ort_decoder = OrtDecoder(tmp_path)
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (2, 9, 6)]  # 2: left-padded to 4
    ids, mask = left_pad(rows, pad_id=2)
    routed.set_routing(routing, record=True)
    want = generate(routed, ids, mask, GREEDY)
    got = generate(ort_decoder, ids, mask, GREEDY)
    assert got.tokens == want.tokens
    if routing == "threshold":
        assert 0.0 < want.execute_fraction < 1.0  # routing skipped work in those very steps
        # the file's decisions output: the same decisions as PyTorch's, unit by unit, decode steps only
        assert manifest["decision_units"] == list(routed.units)
        assert got.execute_fractions == want.execute_fractions
        copied = generate(ort_decoder, ids, mask, replace(GREEDY, kv_cache="copy"))  # session.run, no binding
        assert copied.tokens == want.tokens and copied.execute_fractions == want.execute_fractions
        assert got.execute_fraction == pytest.approx(want.execute_fraction, abs=1e-12)
        assert all(c["decisions_equal"] for c in manifest["verification"]["cases"])
    else:
        assert "decisions" not in [o.name for o in model.graph.output]
        assert got.execute_fraction is None


def test_grouped_attention_expands_no_cache(tmp_path):
    """The default file attends with the cache's own Hkv heads; ``grouped_attention=False`` expands the
    keys and values n_rep-fold every step (two Expand per layer): both verified against PyTorch."""
    _, routed = tiny_routed("llama")  # 4 query heads, 2 key/value heads
    routed.set_routing("dense")
    expands = {}
    for grouped in (True, False):
        out = tmp_path / str(grouped)
        config = OnnxDecodeConfig(routing="dense", grouped_attention=grouped)
        manifest = export_decode(routed, out, config, log=lambda _: None)
        assert manifest["verification"]["passed"] and manifest["config"]["grouped_attention"] is grouped
        graph = onnx.load(str(out / FILE), load_external_data=False).graph
        expands[grouped] = sum(n.op_type == "Expand" for n in graph.node)
    assert expands[False] - expands[True] == 2 * routed.arch.n_layers
    assert OnnxDecodeConfig(grouped_attention=False).cache_key() != OnnxDecodeConfig().cache_key()
    assert "grouped_attention" not in OnnxDecodeConfig(grouped_attention=False).cache_key()  # files made before


def test_refuses_what_it_cannot_verify(tmp_path):
    _, routed = tiny_routed("llama", RoutingPlan(kv_policy="drop", lff_rank=16, n_sink=2))
    with pytest.raises(UserError, match="kv_policy='drop'"):
        export_decode(routed, tmp_path, OnnxDecodeConfig(), log=lambda _: None)
    with pytest.raises(UserError, match="routing must be one of"):
        OnnxDecodeConfig(routing="capacity")
    assert not (tmp_path / FILE).exists()
