"""Decoding a folded model: the decode graph folds the same units, and equals folded prefill.

(e) greedy decoding of a folded tiny model: every step's logits equal the folded
    prefill graph's logits at the same position (prompts shorter than n_sink,
    longer ones, and chunked prompts whose sinks arrive after a non-empty past);
    a forecast-folded attention unit keeps its sink slots only in the cache (no
    keys or values for the other tokens: tests/generation/test_compact_cache.py);
    a model folded after its decoder was built decodes folded;
    the dense baseline of a folded model (``dense_decoder``) is the base model, not the
    routed graph in dense mode (whose forecast-folded units still forecast).
"""

import pytest
import torch
from routed_helpers import tiny_routed

from irc.generation import GenerationConfig, generate, left_pad
from irc.generation.decoder import decoder_for, dense_decoder
from irc.nn.folded_unit import FoldedUnit
from irc.plan import RoutingPlan

from tolerances import ROUTED_EQUAL

FOLDS = {"layer0_attn": "forecast", "layer0_mlp": "plain", "layer1_mlp": "forecast"}  # layer1_attn routes


def _folded(family: str, n_sink: int = 4):
    _, routed = tiny_routed(family, RoutingPlan(lff_rank=16, n_sink=n_sink))
    routed.fold(FOLDS)
    routed.set_routing("threshold")
    return routed


def _ids(T: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 300, (1, T), generator=torch.Generator().manual_seed(seed))


def _decode(decoder, ids, chunks):
    """Logits of ``ids`` fed in chunks of the given sizes (the first left-padded to 4), then one by one."""
    T = ids.shape[1]
    first = chunks[0]
    pad = max(4 - first, 0)
    step_ids = torch.cat([ids.new_zeros(1, pad), ids[:, :first]], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, first, dtype=torch.long)], dim=1)
    logits, past = decoder.step(step_ids, mask, decoder.empty_cache(1))
    out, t = [logits[:, pad:]], first
    for size in [*chunks[1:], *[1] * T]:
        if t >= T:
            break
        size = min(size, T - t)
        mask = torch.cat([mask, torch.ones(1, size, dtype=torch.long)], dim=1)
        logits, past = decoder.step(ids[:, t:t + size], mask, past)
        out.append(logits)
        t += size
    return torch.cat(out, dim=1), past


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("chunks", [(1,), (2, 3), (6,)])  # sinks: in the first chunk, split over two, all in one
def test_decode_steps_equal_folded_prefill(family, chunks):
    routed = _folded(family)
    decoder = decoder_for(routed)
    assert list(decoder.units) == ["layer1_attn"]
    ids = _ids(14, seed=len(chunks))
    with torch.no_grad():
        want = routed(ids)
        got, past = _decode(decoder, ids, chunks)
    assert (got - want).abs().max() <= ROUTED_EQUAL
    # layer 0's attention is forecast-folded: a cache of its 4 sink slots only, each holding a sink
    k0, v0 = past[0], past[1]  # [1, Hkv, 4, hd]
    assert k0.shape[2] == v0.shape[2] == 4 and k0.abs().amax(dim=(0, 1, 3)).min() > 0
    pad = max(4 - chunks[0], 0)  # the first prompt chunk is left-padded to 4
    assert past[2].shape[2] == pad + 14  # layer 1 routes: every token has keys
    assert past[2][:, :, pad:].abs().amax(dim=(0, 1, 3)).min() > 0


def test_left_padded_batch_decodes_as_alone():
    routed = _folded("llama", n_sink=2)
    gen = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    rows = [_ids(n, seed=n)[0].tolist() for n in (1, 5, 9)]
    ids, mask = left_pad(rows, pad_id=2)
    batched = generate(routed, ids, mask, config=gen)
    for i, row in enumerate(rows):
        assert batched.tokens[i] == generate(routed, torch.tensor([row]), config=gen).tokens[0]


def test_folding_after_the_decoder_was_built():
    _, routed = tiny_routed("qwen2")
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    assert len(decoder.units) == 4
    routed.fold({"layer1_attn": "forecast"})
    decoder = decoder_for(routed)
    assert list(decoder.units) == ["layer0_attn", "layer0_mlp", "layer1_mlp"]
    folded = decoder.gm.layer1_attn
    assert isinstance(folded, FoldedUnit) and folded.forecaster is routed.folded["layer1_attn"].forecaster
    ids = _ids(10, seed=3)
    with torch.no_grad():
        want = routed(ids)
        got, _ = _decode(decoder, ids, (4,))
    assert (got - want).abs().max() <= ROUTED_EQUAL


@pytest.mark.parametrize("kv_cache", ["static", "copy"])
def test_dense_decoder_of_a_folded_model_is_the_base_model(kv_cache):
    loaded, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=4))
    routed.fold(FOLDS)
    routed.set_routing("dense")
    ids = _ids(9, seed=5)
    gen = GenerationConfig(max_new_tokens=10, stop_at_eos=False, kv_cache=kv_cache)
    dense = dense_decoder(routed)
    got = generate(dense, ids, config=gen)
    with torch.no_grad():
        hf = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                   eos_token_id=None, pad_token_id=2)[0, 9:].tolist()
        logits, _ = dense.step(ids, torch.ones_like(ids), dense.empty_cache(1))
        base = loaded.model(ids).logits
    assert got.tokens[0] == hf
    assert (logits - base).abs().max() <= ROUTED_EQUAL
    assert dense.cache_slots() == [None] * 4 and not dense.units and got.execute_fraction is None
    # the routed graph in dense mode keeps its folds: layer 0's cache holds the sink slots only,
    # and its forecast-folded units change the logits (so it is no dense baseline)
    folded = decoder_for(routed)
    assert folded.cache_slots()[:2] == [4, 4]
    with torch.no_grad():
        mine, _ = folded.step(ids, torch.ones_like(ids), folded.empty_cache(1))
    assert (mine - base).abs().max() > 1e-3
    assert dense_decoder(routed) is dense  # built once per routed model
