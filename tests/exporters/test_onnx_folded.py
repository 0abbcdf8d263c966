"""(d) ONNX export of folded models, verified with ONNX Runtime.

Folded units are branch-free (a fixed number of sink slots), so they export in
every routing and profile; ORT is checked on lengths below and above n_sink and
on rows with fewer real tokens than n_sink.
"""

import numpy as np
import onnx
import pytest
import torch
from routed_helpers import tiny_routed

from irc.exporters.onnx import OnnxExportConfig, export_onnx
from irc.plan import RoutingPlan

FOLDS = {"layer0_attn": "forecast", "layer0_mlp": "plain", "layer1_mlp": "forecast"}  # layer1_attn routes


@pytest.mark.parametrize("family,routing,profile", [("llama", "threshold", "portable"),
                                                    ("qwen3", "capacity", "portable"),
                                                    ("qwen2", "threshold", "trt")])
def test_folded_model_exports_and_verifies(family, routing, profile, tmp_path):
    from irc.exporters.onnx_contrib import inference_session

    _, routed = tiny_routed(family, RoutingPlan(lff_rank=16, n_sink=4))
    routed.fold(FOLDS)
    # capacity 0.75: ceil(c·T) ≥ min(n_sink, T) at every T below, so the dynamic unit's traceable capacity
    # path (k slots per row) and its eager one (k slots plus every sink) choose the same tokens
    config = OnnxExportConfig(routing=routing, capacity=0.75 if routing == "capacity" else None, profile=profile)
    out = tmp_path / "model.onnx"
    manifest = export_onnx(routed, out, config, log=lambda s: None)
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_diff"] < 1e-4
    assert manifest["plan"]["folded"] == FOLDS
    session = inference_session(out)
    routed.set_routing(routing, capacity=config.capacity)
    for T in (1, 3, 11):
        ids = torch.randint(3, 300, (3, T), generator=torch.Generator().manual_seed(T))
        mask = torch.ones_like(ids)
        mask[1, : T - 1] = 0  # one real token
        if T > 4:
            mask[2, :2] = 0
        with torch.no_grad():
            want = routed(ids, mask).numpy()
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        real = mask.bool().numpy()
        assert np.abs(got - want)[real].max() < 1e-4, T


def test_folded_decode_exports_and_verifies(tmp_path):
    from irc.exporters.onnx_decode import OnnxDecodeConfig, export_decode

    _, routed = tiny_routed("llama")
    routed.fold(FOLDS)
    routed.set_routing("threshold")
    manifest = export_decode(routed, tmp_path, OnnxDecodeConfig(routing="threshold"), log=lambda s: None)
    assert manifest["verification"]["passed"] and manifest["verification"]["tokens_equal"]
    n = routed.plan.n_sink
    assert manifest["cache"]["sink_slots"] == {"past.0.key": n, "past.0.value": n}  # layer 0's attention


def test_dense_decode_file_of_a_folded_model_is_the_base_model(tmp_path):
    """The dense file (the baseline of decode speed) is the base model's step, folds undone:
    every layer's cache grows, and ONNX Runtime generates the base model's greedy tokens."""
    from irc.exporters.onnx_decode import OnnxDecodeConfig, OrtDecoder, export_decode
    from irc.generation import GenerationConfig, generate

    loaded, routed = tiny_routed("llama")
    routed.fold(FOLDS)
    routed.set_routing("dense")
    manifest = export_decode(routed, tmp_path, OnnxDecodeConfig(routing="dense"), log=lambda s: None)
    assert manifest["verification"]["passed"] and manifest["cache"]["sink_slots"] == {}
    ids = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(2))
    got = generate(OrtDecoder(tmp_path), ids, config=GenerationConfig(max_new_tokens=8, stop_at_eos=False))
    with torch.no_grad():
        hf = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                   eos_token_id=None, pad_token_id=2)[0, 7:].tolist()
    assert got.tokens[0] == hf


def test_lora_model_exports_prefill_and_decode(tmp_path):
    """A converted model with trained LoRA (the standard preset's) exports; ORT matches torch."""
    from irc.exporters.onnx_decode import OnnxDecodeConfig, export_decode

    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=4, lora_rank=4))
    with torch.no_grad():
        for u in routed.units.values():
            for d in u.lora.values():
                d.B.normal_(0, 0.05)
    routed.fold({"layer0_mlp": "plain"})
    manifest = export_onnx(routed, tmp_path / "model.onnx", OnnxExportConfig(routing="threshold"), log=lambda s: None)
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_diff"] < 1e-4
    routed.set_routing("threshold")
    # the step file too: its one-token steps, LoRA and folds included, verified against torch
    config = OnnxDecodeConfig(routing="threshold", step_file=True)
    manifest = export_decode(routed, tmp_path / "decode", config, log=lambda s: None)
    assert manifest["verification"]["passed"] and manifest["verification"]["tokens_equal"]
    # the files hold each adapted weight merged (irc.nn.lora.merged_lora): no B and A to multiply per
    # call, which ONNX Runtime would not fold inside the decode files' If branches
    for path in (tmp_path / "model.onnx", tmp_path / "decode" / "decode.onnx", tmp_path / "decode" / "decode_step.onnx"):
        names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer]
        assert not [n for n in names if ".lora." in n], path.name
    # and the model keeps its LoRA: the adapted weights still move with B
    delta = next(iter(routed.units.values())).lora["q_proj"]
    owner = next(iter(routed.units.values())).body.q_proj
    before = owner.weight.detach().clone()
    with torch.no_grad():
        delta.B.add_(0.1)
    assert not torch.equal(owner.weight, before)
