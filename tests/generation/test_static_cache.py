"""The static KV cache (preallocated buffers written in place) against the copying cache.

(a) every step's logits of the static cache equal the copying cache's, dense and
    routed (kv_policy "keep" and "drop"), batch 1 and a left-padded batch, and a folded model (sink-slot layers
    beside full-length ones; a forecast-folded layer at full length, n_sink = 1);
    greedy ``generate`` gives the same tokens with ``kv_cache="static"`` and ``"copy"``;
(b) the graph itself writes in place: each full-length present is a prefix view of
    its past's buffer, and the past positions are not rewritten (under ``no_grad`` and
    ``inference_mode``);
(c) a buffer too short grows once (``adopt``), then writes in place again;
(d) the pass turns exactly the cache appends into ``kv_append`` (two per attention
    part that returns the cache), and ``restore_cat`` undoes it; while exporting,
    ``kv_append`` is ``cat``;
(e) grouped-query attention reads the cache's own heads: each attention part's
    repeat of keys and values is ``repeat_kv`` (eagerly the cache itself) and its
    attention ``grouped_sdpa`` (``enable_gqa``), equal to attention over the repeat.
    (The logits above already run through it.) While tracing (ONNX exports),
    ``grouped_attention`` writes it as matmuls over grouped query rows: equal to
    SDPA over the repeat, a left-padding query row (nothing to attend) zeros.

ONNX Runtime's bound cache: tests/exporters/test_onnx_decode_cache.py.
"""

import pytest
import torch
from routed_helpers import tiny_routed

from irc.generation import GenerationConfig, generate, left_pad, static_cache
from irc.generation.decoder import decoder_for
from irc.passes.grouped_kv_attention import grouped_attention, grouped_sdpa, repeat_kv
from irc.passes.static_kv_cache import restore_cat, static_kv_cache
from irc.plan import RoutingPlan

from tolerances import ROUTED_EQUAL

FOLDS = {"layer0_attn": "forecast", "layer0_mlp": "plain", "layer1_mlp": "forecast"}  # layer1_attn routes


@pytest.fixture(scope="module")
def routed():
    _, model = tiny_routed("llama")
    decoder_for(model)
    return model


@pytest.fixture(scope="module", params=[4, 1], ids=["sink-slots", "full-length"])
def folded(request):
    _, model = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=request.param))
    model.fold(FOLDS)
    model.set_routing("threshold")
    return model


def _batch(B: int, L: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 300, (L - 3 * b,), generator=g).tolist() for b in range(B)]  # left-padded
    return left_pad(rows, pad_id=2)


def _steps(decoder, ids, mask, prompt: int, capacity):
    """Logits of every position: ``prompt`` tokens in one step, then one at a time."""
    B = ids.shape[0]
    with torch.no_grad():
        logits, past = decoder.step(ids[:, :prompt], mask[:, :prompt], decoder.empty_cache(B, capacity=capacity))
        out = [logits]
        for t in range(prompt, ids.shape[1]):
            logits, past = decoder.step(ids[:, t:t + 1], mask[:, :t + 1], past)
            out.append(logits)
    return torch.cat(out, dim=1), past


def _assert_same(decoder, ids, mask, prompt=6, capacity=None):
    want, _ = _steps(decoder, ids, mask, prompt, None)
    got, past = _steps(decoder, ids, mask, prompt, capacity or ids.shape[1])
    real = mask.bool()
    assert (got - want)[real].abs().max() <= ROUTED_EQUAL
    assert torch.equal(got.argmax(-1)[real], want.argmax(-1)[real])
    return past


@pytest.mark.parametrize("mode", ["dense", "threshold"])
@pytest.mark.parametrize("B", [1, 3])
def test_static_equals_copying_cache(routed, mode, B):
    routed.set_routing(mode, record=True)
    decoder = decoder_for(routed)
    ids, mask = _batch(B, 14, seed=B)
    past = _assert_same(decoder, ids, mask)
    assert all(static_cache.buffer_of(p) is not None for p in past)  # still the preallocated buffers
    config = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    static = generate(routed, ids[:, :6], mask[:, :6], config)
    copied = generate(routed, ids[:, :6], mask[:, :6], GenerationConfig(max_new_tokens=8, stop_at_eos=False,
                                                                        kv_cache="copy"))
    assert static.tokens == copied.tokens
    assert static.execute_fraction == copied.execute_fraction
    if mode == "threshold":
        assert 0 < static.execute_fraction < 1


def test_kv_drop_static_equals_copying_cache():
    _, model = tiny_routed("llama", RoutingPlan(kv_policy="drop", lff_rank=16, n_sink=2))
    model.set_routing("threshold")
    ids, mask = _batch(3, 12, seed=7)
    _assert_same(decoder_for(model), ids, mask, prompt=5)


@pytest.mark.parametrize("B", [1, 3])
def test_folded_static_equals_copying_cache(folded, B):
    decoder = decoder_for(folded)
    ids, mask = _batch(B, 14, seed=10 + B)
    past = _assert_same(decoder, ids, mask, prompt=5)
    slots = decoder.cache_slots()
    assert [static_cache.buffer_of(p) is not None for p in past] == [n is None for n in slots]


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_graph_writes_in_place(routed, grad_mode):
    """Under inference_mode too, where a view does not reference its base tensor (the buffers
    were once found by a weak registry there, and every step silently copied the cache)."""
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    ids, mask = _batch(2, 9, seed=3)
    with grad_mode():
        _, past = decoder.step(ids[:, :8], mask[:, :8], decoder.empty_cache(2, capacity=16))
        before = [p.clone() for p in past]
        _, *present = decoder.gm(ids[:, 8:], mask, *past)  # the graph alone, no adopt
    for p, q, old in zip(past, present, before, strict=True):
        assert static_cache.buffer_of(p) is not None
        assert static_cache.buffer_of(q) is static_cache.buffer_of(p) and q.shape[2] == 9
        assert torch.equal(q[:, :, :8], old)  # the past positions untouched, and not copied


def test_a_full_buffer_grows_once(routed):
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    ids, mask = _batch(1, 14, seed=4)
    past = _assert_same(decoder, ids, mask, capacity=8)  # the prompt fits, step 3 overflows
    buffer = static_cache.buffer_of(past[0])
    assert buffer is not None and buffer.shape[2] == 16


def test_pass_rewrites_the_cache_appends_only(routed):
    gm = decoder_for(routed).gm
    appends = _count(gm, static_cache.kv_append)
    # each attention unit: its body and its kv part return the cache (keys and values); query does not
    assert appends == {"layer0_attn.body": 2, "layer0_attn.kv": 2, "layer1_attn.body": 2, "layer1_attn.kv": 2}
    cats = _count(gm, torch.ops.aten.cat.default)
    restore_cat(gm)
    assert _count(gm, static_cache.kv_append) == {}
    back = _count(gm, torch.ops.aten.cat.default)
    assert {k: back[k] - cats.get(k, 0) for k in back if back[k] != cats.get(k, 0)} == appends
    assert static_kv_cache(gm).stats["appends"] == appends


def test_kv_append_is_cat_elsewhere():
    past, new = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 1, 4)
    assert torch.equal(static_cache.kv_append(past, new, 2), torch.cat([past, new], 2))
    view = static_cache.allocate(1, 2, 8, 4, torch.float32)
    out = static_cache.kv_append(view, new, -2)
    assert static_cache.buffer_of(out) is not None and torch.equal(out, new)
    # a slice of a buffer that is not a prefix view is not written into
    assert static_cache.buffer_of(static_cache.buffer_of(view)[:, 1:]) is None


def test_grouped_attention_reads_the_cache_heads(routed):
    gm = decoder_for(routed).gm
    repeats = {f"layer{i}_attn.{part}": 2 for i in (0, 1) for part in ("body", "kv")}
    assert _count(gm, repeat_kv) == repeats  # keys and values
    assert _count(gm, grouped_sdpa) == {f"layer{i}_attn.{part}": 1 for i in (0, 1) for part in ("body", "query")}
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g), \
        torch.randn(2, 2, 7, 16, generator=g)
    mask = torch.zeros(2, 1, 3, 7)
    assert repeat_kv(k, 2) is k
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            mask)
    assert (grouped_sdpa(q, k, v, mask) - want).abs().max() <= ROUTED_EQUAL


@pytest.mark.parametrize("mask_heads", [1, 4])
def test_grouped_attention_equals_sdpa_over_the_repeat(mask_heads):
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, T, S = 2, 4, 2, 3, 7
    q, k, v = torch.randn(B, H, T, 16, generator=g), torch.randn(B, Hkv, S, 16, generator=g), \
        torch.randn(B, Hkv, S, 16, generator=g)
    mask = torch.rand(B, mask_heads, T, S, generator=g) > 0.3
    mask[..., -1] = True
    mask[1, :, 0] = False  # row 1's first query: a padding token, nothing to attend
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            mask, scale=0.3)
    got = grouped_attention(q, k, v, mask, scale=0.3)
    assert torch.equal(got[1, :, 0], torch.zeros(H, 16)) and torch.equal(want[1, :, 0], got[1, :, 0])
    assert (got - want).abs().max() <= ROUTED_EQUAL
    additive = torch.zeros(B, mask_heads, T, S).masked_fill(~mask, float("-inf"))[:1]  # rows with keys only
    want = torch.nn.functional.scaled_dot_product_attention(q[:1], k[:1].repeat_interleave(2, 1),
                                                            v[:1].repeat_interleave(2, 1), additive)
    assert (grouped_attention(q[:1], k[:1], v[:1], additive) - want).abs().max() <= ROUTED_EQUAL


def test_grouped_sdpa_while_tracing_falls_back_for_a_causal_flag(monkeypatch):
    """A causal flag (no explicit mask) while tracing: SDPA over the expanded heads, not an error."""
    import irc.passes.grouped_kv_attention as grouped

    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g), \
        torch.randn(1, 2, 3, 8, generator=g)
    monkeypatch.setattr(grouped, "_tracing", lambda: True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    assert (grouped_sdpa(q, k, v, is_causal=True) - want).abs().max() <= ROUTED_EQUAL
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    assert (grouped_sdpa(q, k, v, mask) - want).abs().max() <= ROUTED_EQUAL  # the grouped matmuls


def _count(gm, target) -> dict[str, int]:
    counts = {}
    for name, module in gm.named_modules():
        if isinstance(module, torch.fx.GraphModule):
            n = sum(1 for node in module.graph.nodes if node.op == "call_function" and node.target == target)
            if n:
                counts[name or "<root>"] = n
    return counts
