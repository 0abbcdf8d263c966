"""ONNX export (capacity routing, portable profile) on tiny models, verified with ONNX Runtime."""

import json

import numpy as np
import onnx
import pytest
import torch
from routed_helpers import batch, eager_and_traceable, tiny_routed

from irc.errors import UserError
from irc.exporters.onnx import OnnxExportConfig, export_onnx, sample_inputs
from irc.plan import RoutingPlan

from tiny import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("routing", [("capacity", {"capacity": 0.6}), ("capacity", {"capacity": 0.25}), ("threshold", {})])
def test_traceable_path_equals_the_eager_one(family, routing):
    mode, setting = routing
    _, routed = tiny_routed(family)
    for T in (1, 3, 7, 64):  # T=3: ceil(c·T) can be fewer than the sinks
        ids, mask = batch(T)
        want, got = eager_and_traceable(routed, ids, mask, mode, **setting)
        assert (got - want)[mask.bool()].abs().max() <= 1e-5


EXPORTS = [  # (family, routing, profile): every routing × profile, spread over the families
    ("llama", "capacity", "portable"), ("qwen3", "capacity", "trt"),
    ("mistral", "threshold", "portable"), ("qwen2", "threshold", "trt"), ("llama", "threshold", "trt"),
]


@pytest.mark.parametrize("family,routing,profile", EXPORTS)
def test_export_verify_and_run(family, routing, profile, tmp_path):
    from irc.exporters.onnx_contrib import inference_session

    _, routed = tiny_routed(family)
    out = tmp_path / "model.onnx"
    config = OnnxExportConfig(routing=routing, capacity=0.5 if routing == "capacity" else None, profile=profile)
    manifest = export_onnx(routed, out, config, log=lambda s: None)
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_diff"] < 1e-4
    assert manifest["verification"]["argmax_agreement"] == 1.0
    saved = json.loads((tmp_path / "model.onnx.json").read_text())
    assert (saved["routing"], saved["profile"]) == (routing, profile)
    assert saved["capacity"] == (0.5 if routing == "capacity" else None)
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    graph = onnx.load(str(out), load_external_data=False).graph
    ops = {(n.domain, n.op_type) for n in graph.node}
    if profile == "portable":
        assert {("", "Gather"), ("", "ScatterND"), ("", "TopK")} <= ops
        assert all(domain == "" for domain, _ in ops)
    else:
        assert {("ai.onnx.contrib", "TokenGather"), ("ai.onnx.contrib", "TokenScatter")} <= ops
        assert ("", "ScatterND") not in ops
        plugin = next(n for n in graph.node if n.op_type == "TokenScatter")
        assert {a.name: a.s for a in plugin.attribute} == {"plugin_namespace": b"irc", "plugin_version": b"1"}
        assert manifest["trt_lint"]["passed"] and manifest["dynamic_axes"]["seq"][1] <= 3840
    if routing == "threshold":
        assert ("", "NonZero") in ops
    # dynamic axes: a batch and a length the export never saw, left padding in one row
    session = inference_session(out)
    ids = torch.randint(0, 300, (3, 33))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    routed.set_routing(routing, capacity=config.capacity)
    with torch.no_grad():
        want = routed(ids, mask).numpy()
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - want)[mask.bool().numpy()].max() < 1e-4
    fractions = [u.execute_fraction for u in routed.units.values()]
    assert 0 < min(fractions) and max(fractions) < 1 or routing == "capacity"  # routing really splits tokens


@pytest.mark.parametrize("folded", [False, True])
def test_dense_export_equals_the_base_model(folded, tmp_path):
    """Folded too: a forecast-folded unit ignores the dense mode, so the dense file is the base graph."""
    from irc.exporters.onnx_contrib import inference_session

    loaded, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=2))
    if folded:
        routed.fold({"layer0_attn": "forecast", "layer1_mlp": "forecast"})
    manifest = export_onnx(routed, tmp_path / "dense.onnx", OnnxExportConfig(routing="dense"), log=lambda s: None)
    assert manifest["routing"] == "dense" and manifest["verification"]["max_abs_diff"] < 1e-4
    ops = {n.op_type for n in onnx.load(str(tmp_path / "dense.onnx"), load_external_data=False).graph.node}
    assert "ScatterND" not in ops and "TopK" not in ops
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    got = inference_session(tmp_path / "dense.onnx").run(None, {"input_ids": ids.numpy(),
                                                                "attention_mask": np.ones((2, 9), np.int64)})[0]
    with torch.no_grad():
        want = loaded.model(ids).logits.numpy()
    assert np.abs(got - want).max() < 1e-4


def test_a_broken_lowering_fails_and_leaves_no_file(tmp_path, monkeypatch):
    import irc.exporters.onnx as exporter

    def wrong_scatter(base, src, index):  # drops the routed rows: outputs differ
        return base

    def broken(profile):
        table = dict(original(profile))
        table[torch.ops.irc.token_scatter.default] = wrong_scatter
        return table

    original = exporter._translations
    monkeypatch.setattr(exporter, "_translations", broken)
    _, routed = tiny_routed("llama")
    out = tmp_path / "model.onnx"
    with pytest.raises(UserError, match="ONNX Runtime does not match PyTorch"):
        export_onnx(routed, out, OnnxExportConfig(capacity=0.5), log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_is_said_plainly(tmp_path):
    from irc.cli import main

    from tiny import save_tiny

    model = save_tiny("llama", tmp_path / "tiny")
    assert main(["export", "onnx", str(model), "-o", str(tmp_path / "m.onnx"), "--dtype", "bf16"]) == 2
    assert not (tmp_path / "m.onnx").exists()
    _, mod = tiny_routed("llama", RoutingPlan(variant="mod", n_sink=1))
    with pytest.raises(UserError, match="Mixture-of-Depths"):
        export_onnx(mod, tmp_path / "m.onnx")


def test_sample_inputs_cover_odd_and_padded():
    shapes = [(tuple(i.shape), bool((m == 0).any())) for i, m in sample_inputs(100)]
    assert ((1, 7), False) in shapes and ((2, 16), True) in shapes


def test_perplexity_through_onnx_runtime_equals_pytorch(tiny_dirs, tmp_path, capsys):
    import irc
    from irc.cli import main
    from irc.eval import evaluate_perplexity
    from irc.exporters.onnx_runtime import OnnxModel

    routed = irc.route(irc.load_model(str(tiny_dirs["llama"]), dtype="fp32"), RoutingPlan(lff_rank=8, n_sink=2))
    out = tmp_path / "m.onnx"
    export_onnx(routed, out, OnnxExportConfig(capacity=0.75), log=lambda s: None)
    tokens = np.random.default_rng(0).integers(3, 300, size=400).astype(np.int32)
    onnx_ppl = evaluate_perplexity(OnnxModel(out), tokens, seq_len=64, show_progress=False).perplexity
    routed.set_routing("capacity", capacity=0.75)
    torch_ppl = evaluate_perplexity(routed, tokens, seq_len=64, show_progress=False).perplexity
    assert onnx_ppl == pytest.approx(torch_ppl, rel=1e-4)
    text = tmp_path / "t.txt"
    text.write_text("Paris is the capital of France. Ada and Alan wrote numbers. " * 30)
    assert main(["eval", str(out), "--data", str(text), "--seq-len", "64", "--max-tokens", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == "onnxruntime" and result["perplexity"] > 1


def test_onnx_model_errors(tmp_path):
    from irc.exporters.onnx_runtime import OnnxModel

    with pytest.raises(UserError, match="no such ONNX file"):
        OnnxModel(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(UserError, match="ONNX Runtime cannot load"):
        OnnxModel(bad)
