"""Routed generation on tiny models: the decode graph against prefill, HF generate, and itself.

(a) ``dense`` routing generates the base model's greedy tokens (ours and HF ``generate``);
(b) with threshold routing, every decode step's logits equal the routed prefill
    graph's logits at the same position (prefill and decode route identically);
(c) a left-padded batch decodes each row as it decodes alone;
(d) one set of weights: the decode units hold the prefill units' routers,
    forecasters and thresholds; kv_policy="drop" matches its prefill too.
"""

import pytest
import torch
from routed_helpers import tiny_routed

from irc.generation import GenerationConfig, generate, left_pad
from irc.generation.decoder import decoder_for
from irc.nn.cached_unit import CachedRoutedUnit
from irc.plan import RoutingPlan

from tiny import FAMILIES
from tolerances import ROUTED_EQUAL

GREEDY = GenerationConfig(max_new_tokens=12, stop_at_eos=False)


def _prompt(T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (1, T), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_len", [1, 9])  # 1: left-padded to the decode graph's minimum context
def test_dense_generation_equals_base_and_hf_generate(family, prompt_len):
    loaded, routed = tiny_routed(family)
    routed.set_routing("dense")
    ids = _prompt(prompt_len)
    got = generate(routed, ids, config=GREEDY).tokens[0]
    with torch.no_grad():
        hf = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                   eos_token_id=None, pad_token_id=2)[0, prompt_len:].tolist()
        seq = ids
        for _ in range(12):  # the base model without a cache, one full forward per token
            nxt = loaded.model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert got == hf
    assert got == seq[0, prompt_len:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_len", [4, 7])
def test_decode_steps_equal_routed_prefill(family, prompt_len):
    _, routed = tiny_routed(family)
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    ids = _prompt(prompt_len + 10, seed=prompt_len)
    with torch.no_grad():
        want = routed(ids)  # the prefill graph on the whole sequence, [1, T, V]
        logits, past = decoder.step(ids[:, :prompt_len], torch.ones(1, prompt_len, dtype=torch.long),
                                    decoder.empty_cache(1))
        steps = [logits]
        for t in range(prompt_len, ids.shape[1]):
            logits, past = decoder.step(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), past)
            steps.append(logits)
    got = torch.cat(steps, dim=1)
    assert (got - want).abs().max() <= ROUTED_EQUAL
    fraction = decoder.execute_fraction()
    assert fraction is not None and 0.0 < fraction < 1.0  # routing really skipped work while decoding


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batch_rows_decode_as_alone(family):
    _, routed = tiny_routed(family)
    routed.set_routing("threshold")
    rows = [_prompt(n, seed=n)[0].tolist() for n in (5, 9, 7)]
    ids, mask = left_pad(rows, pad_id=2)
    batched = generate(routed, ids, mask, config=GREEDY)
    for i, row in enumerate(rows):
        alone = generate(routed, torch.tensor([row]), config=GREEDY)
        assert batched.tokens[i] == alone.tokens[0]


def test_batch_row_logits_equal_alone():
    _, routed = tiny_routed("llama")
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    rows = [_prompt(n, seed=n)[0].tolist() for n in (4, 8)]
    ids, mask = left_pad(rows, pad_id=2)
    nxt = torch.tensor([[17], [23]])
    with torch.no_grad():
        _, past = decoder.step(ids, mask, decoder.empty_cache(2))
        batched, _ = decoder.step(nxt, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), past)
        for i, row in enumerate(rows):
            one = torch.tensor([row])
            _, p1 = decoder.step(one, torch.ones_like(one), decoder.empty_cache(1))
            alone, _ = decoder.step(nxt[i:i + 1], torch.ones(1, len(row) + 1, dtype=torch.long), p1)
            # left padding shifts rotary positions; attention depends on relative ones only
            assert (batched[i] - alone[0]).abs().max() <= 1e-4


def test_one_set_of_weights():
    _, routed = tiny_routed("llama")
    decoder = decoder_for(routed)
    for name, unit in decoder.units.items():
        source = routed.units[name]
        assert isinstance(unit, CachedRoutedUnit)
        assert unit.router is source.router and unit.forecaster is source.forecaster
        assert unit.threshold is source.threshold
        assert unit.body.get_parameter("q_proj.weight" if unit.kind == "attn" else "gate_proj.weight").data_ptr() \
            == source.body.get_parameter("q_proj.weight" if unit.kind == "attn" else "gate_proj.weight").data_ptr()
    # a change to the prefill graph's routing (training, calibration) moves the decode graph
    routed.units["layer0_mlp"].threshold.fill_(1e9)
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    ids = _prompt(12)
    with torch.no_grad():
        decoder.step(ids, torch.ones_like(ids), decoder.empty_cache(1))
    unit = decoder.units["layer0_mlp"]
    assert unit.executed == 2  # the n_sink = 2 sinks only


def test_kv_drop_decode_equals_prefill():
    _, routed = tiny_routed("llama", RoutingPlan(kv_policy="drop", lff_rank=16, n_sink=2))
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    ids = _prompt(14, seed=3)
    with torch.no_grad():
        want = routed(ids)
        logits, past = decoder.step(ids[:, :5], torch.ones(1, 5, dtype=torch.long), decoder.empty_cache(1))
        steps = [logits]
        for t in range(5, 14):
            logits, past = decoder.step(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), past)
            steps.append(logits)
    assert (torch.cat(steps, dim=1) - want).abs().max() <= ROUTED_EQUAL


def test_sampling_is_seeded():
    _, routed = tiny_routed("llama")
    routed.set_routing("threshold")
    config = GenerationConfig(max_new_tokens=10, temperature=0.9, top_p=0.8, seed=5, stop_at_eos=False)
    a = generate(routed, _prompt(6), config=config).tokens
    b = generate(routed, _prompt(6), config=config).tokens
    assert a == b


def test_stops_at_eos():
    _, routed = tiny_routed("llama")
    routed.set_routing("dense")
    ids = _prompt(6)
    first = generate(routed, ids, config=GREEDY).tokens[0]
    stop = first[3]
    got = generate(routed, ids, config=GREEDY, eos_token_ids=(stop,)).tokens[0]
    assert got == first[:first.index(stop) + 1]


def test_config_validates():
    from irc.errors import UserError

    with pytest.raises(UserError, match="top-p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(UserError, match="max-new-tokens"):
        GenerationConfig(max_new_tokens=0)


def _fast_and_general(decoder, ids) -> list[tuple[torch.Tensor, dict]]:
    """Batch-1 decoding of ``ids [1, 16]`` after a 4-token prompt, through ``decoder.step`` (the
    fast path, a StepHint) and through the general path: per path, the step logits (fp32) and
    the per-unit execute fractions."""
    results = []
    for fast in (True, False):
        decoder.reset_stats()
        step = decoder.step if fast else _general_step(decoder)
        with torch.no_grad():
            logits, past = step(ids[:, :4], torch.ones(1, 4, dtype=torch.long), decoder.empty_cache(1))
            steps = []
            for t in range(4, 16):
                logits, past = step(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), past)
                steps.append(logits.float())
        results.append((torch.cat(steps, dim=1), decoder.execute_fractions()))
    return results


def test_one_token_fast_path_equals_the_general_path():
    """Batch-1 steps take ``CachedRoutedUnit._one_token`` (a StepHint); the general path must agree."""
    _, routed = tiny_routed("qwen3")
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    (fast_logits, fast_fractions), (slow_logits, slow_fractions) = _fast_and_general(decoder, _prompt(16, seed=5))
    assert torch.equal(fast_logits, slow_logits)
    assert fast_fractions == slow_fractions
    assert any(0 < f < 1 for f in fast_fractions.values() if f is not None)


def test_one_token_fast_path_in_bf16_decides_as_the_general_path():
    """bf16: the fast path's routers and forecasters run outside oneDNN (``small_linear``); the same
    decisions as the general path's ``F.linear``, logits within bf16 rounding."""
    from routed_helpers import randomize_routing, tiny_loaded

    import irc

    routed = irc.route(tiny_loaded("qwen3", dtype=torch.bfloat16), RoutingPlan(lff_rank=16, n_sink=2))
    randomize_routing(routed)
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    assert next(iter(decoder.units.values())).router.fc1.weight.dtype == torch.bfloat16
    (fast_logits, fast_fractions), (slow_logits, slow_fractions) = _fast_and_general(decoder, _prompt(16, seed=5))
    assert fast_fractions == slow_fractions
    assert any(0 < f < 1 for f in fast_fractions.values() if f is not None)
    torch.testing.assert_close(fast_logits, slow_logits, rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_rows_fast_path_equals_the_general_path(family, monkeypatch):
    """One-token steps of several rows take ``CachedRoutedUnit._one_token_rows`` (a RowsHint);
    the general path must agree: logits, decisions (execute fractions), and a left-padded row
    whose first real tokens are sinks while the other rows are past theirs."""
    _, routed = tiny_routed(family)
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    B, T = 3, 16
    ids = torch.cat([_prompt(T, seed=s) for s in range(B)])
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, :6] = 0  # row 2 starts with padding: its first real tokens are decoded as sinks
    calls, gathered = [], []
    real = CachedRoutedUnit._one_token_rows
    monkeypatch.setattr(CachedRoutedUnit, "_one_token_rows",
                        lambda self, *a: calls.append(1) or real(self, *a))
    import irc.nn.cached_unit as cached_unit

    real_gather = cached_unit.gathered_rows  # attention's query part on the executing rows only
    monkeypatch.setattr(cached_unit, "gathered_rows",
                        lambda unit, a, *rest: gathered.append(a.shape[0]) or real_gather(unit, a, *rest))
    results = []
    for fast in (True, False):
        decoder.reset_stats()
        step = decoder.step if fast else _general_step(decoder)
        with torch.no_grad():
            logits, past = step(ids[:, :4], mask[:, :4], decoder.empty_cache(B))
            steps = []
            for t in range(4, T):
                logits, past = step(ids[:, t:t + 1], mask[:, :t + 1], past)
                steps.append(logits)
        results.append((torch.cat(steps, dim=1), decoder.execute_fractions()))
    (fast_logits, fast_fractions), (slow_logits, slow_fractions) = results
    assert calls, "the rows fast path never ran"
    assert gathered, "no step ran attention on some of its rows"
    assert torch.equal(fast_logits, slow_logits)
    assert fast_fractions == slow_fractions
    assert any(0 < f < 1 for f in fast_fractions.values() if f is not None)


def _general_step(decoder):
    """``decoder.step`` without the StepHint: every unit takes the general cached path."""
    def step(ids, mask, past):
        logits, *present = decoder.gm(ids, mask, *past)
        return logits, present
    return step
