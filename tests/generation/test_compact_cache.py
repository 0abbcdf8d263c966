"""A forecast-folded attention unit keeps a KV cache of its sink slots only (decode graphs).

(a) greedy decoding with sink-slot caches (layer 0's, layer 1's, or both: then
    no layer's cache holds the past length) gives every step the logits the folded
    prefill graph gives the whole sequence: batch 1 with prompts shorter and longer
    than n_sink, chunked prompts, and a left-padded batch with a row of fewer real
    tokens than n_sink;
(b) after a long decode a sink-slot layer's cache has min(n_sink, P+T) positions,
    the other layers' P+T; a step without new sinks returns the past tensor itself;
(c) the KV-cache bytes per token, dense and routed, against a hand computation and
    against the bytes the cache actually grew by;
(d) what stays full length: n_sink < 2, plain folds, unfolded models.

ONNX Runtime decoding of such a model: tests/exporters/test_onnx_decode_compact.py.
"""

import pytest
import torch
from routed_helpers import tiny_routed

from irc.generation.capture import cache_shape
from irc.generation.decoder import decoder_for
from irc.generation.stats import decode_kv_bytes, kv_cache_bytes, kv_cache_line
from irc.passes.compact_sink_caches import compact_sink_caches
from irc.plan import RoutingPlan

from tolerances import ROUTED_EQUAL

N_SINK = 4
# layer 0 compact (export reads P from another layer); layer 1 compact (export's P source: the
# pass re-derives it from the mask); both (no past holds P: the guards get a stand-in)
FOLDS = {
    "layer0": {"layer0_attn": "forecast", "layer0_mlp": "plain", "layer1_mlp": "forecast"},
    "layer1": {"layer1_attn": "forecast", "layer0_mlp": "forecast"},
    "both": {"layer0_attn": "forecast", "layer1_attn": "forecast", "layer1_mlp": "plain"},
}
COMPACT = {"layer0": [0, 1], "layer1": [2, 3], "both": [0, 1, 2, 3]}  # cache tensor indices


def _folded(family: str, folds: str, n_sink: int = N_SINK):
    _, routed = tiny_routed(family, RoutingPlan(lff_rank=16, n_sink=n_sink))
    routed.fold(FOLDS[folds])
    routed.set_routing("threshold")
    return routed


def _ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def _decode(decoder, ids, mask, prompt: int, chunk: int = 1):
    """Logits of every position of ``ids [B, L]``: the first ``prompt`` in one step, then ``chunk`` at a time."""
    logits, past = decoder.step(ids[:, :prompt], mask[:, :prompt], decoder.empty_cache(ids.shape[0]))
    out, t = [logits], prompt
    while t < ids.shape[1]:
        size = min(chunk, ids.shape[1] - t)
        logits, past = decoder.step(ids[:, t:t + size], mask[:, :t + size], past)
        out.append(logits)
        t += size
    return torch.cat(out, dim=1), past


@pytest.mark.parametrize("folds", ["layer0", "layer1", "both"])
@pytest.mark.parametrize("real, chunk", [(1, 1), (2, 3), (6, 1)])  # sinks: in decode steps, over chunks, in the prompt
def test_sink_slot_decode_equals_folded_prefill(folds, real, chunk):
    routed = _folded("llama", folds)
    decoder = decoder_for(routed)
    assert [i for i, n in enumerate(decoder.cache_slots()) if n] == COMPACT[folds]
    L, pad = 18, max(4 - real, 0)  # the prompt is left-padded to 4 tokens, as generate does
    ids = _ids(1, L, seed=real)
    mask = torch.ones(1, L, dtype=torch.long)
    mask[:, :pad] = 0
    with torch.no_grad():
        want = routed(ids, mask)
        got, past = _decode(decoder, ids, mask, pad + real, chunk)
    assert (got - want)[:, pad:].abs().max() <= ROUTED_EQUAL
    for i, p in enumerate(past):
        assert p.shape[2] == (N_SINK if i in COMPACT[folds] else L), i


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padded_batch_with_a_row_shorter_than_the_sinks(family):
    routed = _folded(family, "both")
    decoder = decoder_for(routed)
    reals, L = (2, 5, 9), 20  # row 0: 2 real prompt tokens, its other 2 sinks come in decode steps
    ids = _ids(3, L, seed=5)
    mask = torch.ones(3, L, dtype=torch.long)
    for b, n in enumerate(reals):
        mask[b, :9 - n] = 0
    with torch.no_grad():
        want = routed(ids, mask)
        got, past = _decode(decoder, ids, mask, prompt=9)
    real = mask.bool()
    assert (got - want)[real].abs().max() <= ROUTED_EQUAL
    assert all(p.shape[2] == N_SINK for p in past)
    # slot j of a row holds its j-th real token: row 0's sinks are its 2 prompt tokens and the next 2
    assert past[0].abs().amax(dim=(1, 3)).min() > 0


def test_a_step_without_sinks_returns_the_past_itself():
    routed = _folded("llama", "layer0")
    decoder = decoder_for(routed)
    ids = _ids(1, 7, seed=1)
    with torch.no_grad():
        _, past = decoder.step(ids[:, :6], torch.ones(1, 6, dtype=torch.long), decoder.empty_cache(1))
        _, present = decoder.step(ids[:, 6:], torch.ones(1, 7, dtype=torch.long), past)
    assert present[0] is past[0] and present[1] is past[1]  # no growth, no copy
    assert present[2].shape[2] == 7


def test_kv_cache_bytes_per_token():
    routed = _folded("llama", "layer0")
    decoder = decoder_for(routed)
    layers, kv_heads, head_dim = cache_shape(routed.base.model.config)
    assert (layers, kv_heads, head_dim) == (2, 2, 16)
    kv = kv_cache_bytes(decoder.cache_slots(), kv_heads, head_dim, itemsize=4)
    # by hand: one token's keys or values in one layer = 2 heads × 16 × 4 B = 128 B; dense: 2 layers × 2
    # tensors; routed: layer 1's two only; layer 0 holds 4 sink slots of keys and values, 2 × 4 × 128 B
    assert kv == {"per_token": 256, "dense_per_token": 512, "attention_layers": 2, "sink_layers": 1,
                  "sink_slots": 4, "sink_bytes": 1024}
    assert kv_cache_line(kv) == "256 B/token (dense 512 B/token; 1 of 2 attention layers keep 4 sink slots)"
    assert decode_kv_bytes(routed, routed) == kv  # what irc generate reports (fp32 model: 4 B)
    # and what the cache really grows by, per row and token, once the sinks are in
    ids = _ids(2, 12, seed=2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        _, past = decoder.step(ids[:, :8], mask[:, :8], decoder.empty_cache(2))
        _, present = decoder.step(ids[:, 8:], mask, past)
    grown = sum(p.nbytes for p in present) - sum(p.nbytes for p in past)
    assert grown == 2 * 4 * kv["per_token"]  # 2 rows, 4 new tokens
    assert sum(p.nbytes for p in present[:2]) == 2 * kv["sink_bytes"]


def test_what_stays_full_length():
    # n_sink = 1: a cache of at most one slot would be a length export specialises
    routed = _folded("llama", "layer0", n_sink=1)
    decoder = decoder_for(routed)
    assert decoder.cache_slots() == [None] * 4
    assert "n_sink=1" in compact_sink_caches(decoder.gm).stats["skipped"]["layer0_attn"]
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=N_SINK))
    assert decoder_for(routed).cache_slots() == [None] * 4  # nothing folded
    routed.fold({"layer0_attn": "plain", "layer1_attn": "forecast"})  # after the decoder was built
    decoder = decoder_for(routed)
    assert decoder.cache_slots() == [None, None, N_SINK, N_SINK]
    kv = kv_cache_bytes(decoder.cache_slots(), 2, 16, itemsize=2)
    assert kv_cache_line(kv) == "128 B/token (dense 256 B/token; 1 of 2 attention layers keep 4 sink slots)"
