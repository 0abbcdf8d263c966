"""``irc.generation.row_kernels``: the bf16 kernel of a decode step's few rows, chosen and applied."""

import pytest
import torch
from routed_helpers import randomize_routing, tiny_loaded

import irc
from irc.errors import UserError
from irc.generation import row_kernels
from irc.generation.decoder import decoder_for, dense_decoder
from irc.plan import RoutingPlan


@pytest.mark.parametrize("timings, limit", [
    ({1: (1.0, 0.5), 2: (1.0, 0.8), 3: (1.0, 1.2), 4: (1.0, 2.0)}, 2),
    ({1: (1.0, 0.95), 2: (1.0, 0.5)}, 0),  # not faster by the margin at one row: never
    ({1: (1.0, 0.5), 2: (1.0, 1.5), 3: (1.0, 0.5)}, 1),  # the first loss ends it
    ({1: (1.0, 0.1), 2: (1.0, 0.1), 3: (1.0, 0.1), 4: (1.0, 0.1)}, 4),
])
def test_choose_takes_the_rows_where_aten_wins_by_the_margin(timings, limit):
    assert row_kernels.choose(timings) == limit


def test_for_rows_switches_onednn_off_and_back():
    assert torch._C._get_mkldnn_enabled()
    with row_kernels.for_rows(1, 2):
        assert not torch._C._get_mkldnn_enabled()
    assert torch._C._get_mkldnn_enabled()
    with row_kernels.for_rows(3, 2):  # more rows than the limit: oneDNN stays
        assert torch._C._get_mkldnn_enabled()
    with pytest.raises(RuntimeError), row_kernels.for_rows(1, 1):
        raise RuntimeError("a failing step")
    assert torch._C._get_mkldnn_enabled()  # restored after an error too
    torch._C._set_mkldnn_enabled(False)
    try:
        with row_kernels.for_rows(1, 1):
            pass
        assert not torch._C._get_mkldnn_enabled()  # left off by the caller: stays off
    finally:
        torch._C._set_mkldnn_enabled(True)


def _mats(*shapes):
    return [torch.randn(*s).bfloat16() for s in shapes]


def test_settings(monkeypatch):
    mats = _mats((8, 16), (16, 8))
    monkeypatch.setenv(row_kernels.ENV, "onednn")
    assert row_kernels.aten_rows(mats) == 0
    monkeypatch.setenv(row_kernels.ENV, "aten")
    assert row_kernels.aten_rows(mats) == row_kernels.MAX_ROWS
    assert row_kernels.aten_rows([m.float() for m in mats]) == 0  # fp32: BLAS either way
    monkeypatch.setenv(row_kernels.ENV, "fastest")
    with pytest.raises(UserError, match="IRC_DECODE_GEMM='fastest': expected auto, onednn or aten"):
        row_kernels.aten_rows(mats)


def test_auto_measures_once_per_set_of_shapes(monkeypatch):
    monkeypatch.setenv(row_kernels.ENV, "auto")
    monkeypatch.setattr(row_kernels, "_MEASURED", {})
    calls = []

    def measure(mats):
        calls.append(sorted(tuple(m.shape) for m in mats))
        return {1: (1.0, 0.5), 2: (1.0, 0.7), 3: (1.0, 1.1)}

    monkeypatch.setattr(row_kernels, "measure", measure)
    a, b = _mats((8, 16), (16, 8)), _mats((16, 8), (8, 16))
    assert row_kernels.aten_rows(a) == 2
    assert row_kernels.aten_rows(b + [b[0]]) == 2  # the same shapes (a storage counted once): not again
    assert calls == [[(8, 16), (16, 8)]]
    assert row_kernels.aten_rows(_mats((4, 4))) == 2 and len(calls) == 2
    assert row_kernels.aten_rows([m.float() for m in a]) == 0 and len(calls) == 2  # fp32: never measured


def test_measure_times_both_kernels_per_row_count():
    timings = row_kernels.measure(_mats((32, 64), (64, 32)), rows=(1, 3))
    assert sorted(timings) == [1, 3]
    assert all(len(t) == 2 and all(s > 0 for s in t) for t in timings.values())
    assert torch._C._get_mkldnn_enabled()


@pytest.mark.parametrize("setting", ["aten", "onednn"])
def test_decode_steps_take_the_chosen_kernels(setting, monkeypatch):
    """bf16 tiny model: one-token steps run with oneDNN off under ``aten`` (not the prompt), for the
    routed and the dense decoder; greedy tokens and logits as oneDNN's, within bf16 rounding."""
    monkeypatch.setenv(row_kernels.ENV, setting)
    routed = irc.route(tiny_loaded("llama", dtype=torch.bfloat16), RoutingPlan(lff_rank=16, n_sink=2))
    randomize_routing(routed)
    routed.set_routing("threshold")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (1, 14), generator=g)
    for decoder in (decoder_for(routed), dense_decoder(routed)):
        seen, forward = [], decoder.gm.forward

        def recording(*args, forward=forward, seen=seen):  # oneDNN's state while the step graph runs
            seen.append(torch._C._get_mkldnn_enabled())
            return forward(*args)

        decoder.gm.forward = recording
        outs = {}
        try:
            for kernels in ("chosen", "onednn"):
                if kernels == "onednn":
                    decoder._aten_rows = 0
                steps = []
                with torch.no_grad():
                    logits, past = decoder.step(ids[:, :6], torch.ones(1, 6, dtype=torch.long), decoder.empty_cache(1))
                    for t in range(6, 14):
                        logits, past = decoder.step(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), past)
                        steps.append(logits.float())
                outs[kernels] = torch.cat(steps, dim=1)
                if kernels == "chosen":
                    on_in_steps = seen[1:]
                    assert seen[0]  # the 6-token prompt: more rows than MAX_ROWS, oneDNN
                    assert on_in_steps and all(on == (setting == "onednn") for on in on_in_steps)
        finally:
            del decoder.gm.forward
            decoder._aten_rows = None
        assert torch.equal(outs["chosen"].argmax(-1), outs["onednn"].argmax(-1))
        torch.testing.assert_close(outs["chosen"], outs["onednn"], rtol=2 ** -5, atol=2 ** -5)
