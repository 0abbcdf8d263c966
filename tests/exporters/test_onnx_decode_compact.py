"""ONNX decode export of a model whose forecast-folded attention keeps a sink-slot KV cache.

The compacted layer (layer 1: the one export reads the past length from in the
captured graph) gets past / present inputs of their own dynamic length; ONNX
Runtime generates PyTorch's tokens on a left-padded batch with a row of fewer
real tokens than n_sink, and its presents keep min(n_sink, P+T) positions.

The same export (one per module: exports cost seconds) decodes with the I/O-bound
cache (``kv_cache="static"``: the cache stays in OrtValues from step to step) the
logits ``session.run`` gives (``"copy"``), batch 1 and a left-padded batch.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from routed_helpers import tiny_routed

from irc.exporters.onnx_decode import FILE, OnnxDecodeConfig, OrtDecoder, export_decode
from irc.generation import GenerationConfig, generate, left_pad
from irc.generation.stats import decode_kv_bytes
from irc.plan import RoutingPlan

from tolerances import FP32_REORDER

N_SINK = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=N_SINK))
    routed.fold({"layer1_attn": "forecast", "layer0_mlp": "forecast"})  # layer0_attn, layer1_mlp route
    routed.set_routing("threshold")
    out = tmp_path_factory.mktemp("decode-compact")
    manifest = export_decode(routed, out, OnnxDecodeConfig(routing="threshold"), log=lambda _: None)
    return routed, out, manifest


def test_sink_slot_cache_exports_and_decodes_in_ort(exported):
    routed, tmp_path, manifest = exported
    assert manifest["verification"]["passed"] and manifest["verification"]["tokens_equal"]
    assert manifest["cache"]["sink_slots"] == {"past.1.key": N_SINK, "past.1.value": N_SINK}
    inputs = {i.name: i.type.tensor_type.shape.dim for i in onnx.load(str(tmp_path / FILE),
                                                                         load_external_data=False).graph.input}
    assert inputs["past.1.key"][2].dim_param != inputs["past.0.key"][2].dim_param  # a length of its own
    ort_decoder = OrtDecoder(tmp_path)
    assert ort_decoder.cache_slots() == [None, None, N_SINK, N_SINK]
    assert decode_kv_bytes(routed, ort_decoder, 4)["per_token"] == 2 * 2 * 16 * 4  # layer 0's keys and values
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (2, 9, 6)]  # row 0: 2 real < n_sink
    ids, mask = left_pad(rows, pad_id=2)
    greedy = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    assert generate(ort_decoder, ids, mask, greedy).tokens == generate(routed, ids, mask, greedy).tokens
    with torch.no_grad():
        _, past = ort_decoder.step(ids, mask, ort_decoder.empty_cache(3))
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            _, past = ort_decoder.step(torch.full((3, 1), 7), mask, past)
    assert [p.shape[2] for p in past] == [12, 12, N_SINK, N_SINK]


def _steps(decoder, ids, mask, prompt: int, capacity):
    logits, past = decoder.step(ids[:, :prompt], mask[:, :prompt], decoder.empty_cache(ids.shape[0], capacity))
    out = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, past = decoder.step(ids[:, t:t + 1], mask[:, :t + 1], past)
        out.append(logits)
    return torch.cat(out, dim=1), past


@pytest.mark.parametrize("lengths", [(9,), (2, 9, 6)], ids=["B1", "B3-left-padded"])
def test_bound_cache_equals_run(exported, lengths):
    routed, path, _ = exported
    decoder = OrtDecoder(path)
    g = torch.Generator().manual_seed(len(lengths))
    ids, mask = left_pad([torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths], pad_id=2)
    ids = torch.cat([ids, torch.randint(3, 300, (ids.shape[0], 6), generator=g)], dim=1)
    mask = torch.cat([mask, torch.ones(ids.shape[0], 6, dtype=torch.long)], dim=1)
    want, copied = _steps(decoder, ids, mask, 9, None)
    got, bound = _steps(decoder, ids, mask, 9, ids.shape[1])
    assert all(isinstance(p, np.ndarray) for p in copied)
    assert all(isinstance(p, ort.OrtValue) for p in bound)  # never converted to numpy
    assert [p.shape()[2] for p in bound] == [p.shape[2] for p in copied] == [15, 15, N_SINK, N_SINK]
    real = mask.bool()
    assert (got - want)[real].abs().max() <= FP32_REORDER
    config = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    prompt, prompt_mask = ids[:, :9], mask[:, :9]
    static = generate(decoder, prompt, prompt_mask, config).tokens
    copy = generate(decoder, prompt, prompt_mask, GenerationConfig(max_new_tokens=8, stop_at_eos=False,
                                                                   kv_cache="copy")).tokens
    assert static == copy == generate(routed, prompt, prompt_mask, config).tokens
