"""``inline_plain_folds``: a decode graph's plain folded units run inline, exactly as their calls did.

- the decode graph of tiny llama folded two units plain (one attention, one MLP) calls neither:
  their ops sit in the top-level graph (snapshot of its op counts), while the forecast-folded
  and routed units stay calls; the folded modules stay registered (weights and LoRA read
  through them);
- decoding through it gives bit-identical logits and caches to the same decode graph with the
  calls kept, for a prompt, batch-1 steps and a left-padded batch's steps, with LoRA deltas
  that are not zero (so a weight read around the LoRA would show);
- the pass leaves a graph without plain folds unchanged.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from routed_helpers import tiny_routed

from irc.generation import decoder as decoder_module
from irc.generation import left_pad
from irc.generation.decoder import decoder_for
from irc.inspect.summary import op_counts
from irc.nn.folded_unit import FoldedUnit
from irc.passes.inline_plain_folds import inline_plain_folds
from irc.passes.route_decoder_blocks import folded_modules
from irc.plan import RoutingPlan

SNAPSHOTS = Path(__file__).parent / "snapshots"
FOLDS = {"layer0_attn": "plain", "layer0_mlp": "forecast", "layer1_mlp": "plain"}  # layer1_attn routes


def _routed(fold: bool = True):
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=2, lora_rank=4))
    with torch.no_grad():  # LoRA B starts at zero: give the deltas something to add
        for unit in [*routed.units.values(), *routed.folded.values()]:
            for p in (unit.lora.parameters() if getattr(unit, "lora", None) is not None else ()):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if fold:
        routed.fold(FOLDS)
    routed.set_routing("threshold")
    return routed


def _calls(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and not str(n.target).startswith("_guards")]


def _without_inlining(routed, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(decoder_module, "_FOLD_PASSES",
                  [p for p in decoder_module._FOLD_PASSES if p[0] != "inline_plain_folds"])
        decoder = decoder_module.build_decoder(routed)
    decoder.sync()
    return decoder


@pytest.mark.parametrize("built", ["after folding", "before folding"])
def test_plain_folds_are_inlined_and_match_snapshot(built):
    routed = _routed(fold=built == "after folding")
    if built == "before folding":  # decoder_for folds (and inlines) the built decoder's graph
        decoder_for(routed)
        routed.fold(FOLDS)
    assert any(getattr(u, "lora", None) is not None for u in routed.folded.values())
    gm = decoder_for(routed).gm
    assert _calls(gm) == ["layer0_mlp", "layer1_attn"]  # forecast-folded and routed units stay calls
    assert set(folded_modules(gm)) == set(FOLDS)  # inlined units stay registered
    assert any(n.op == "get_attr" and n.target == "layer1_mlp.body.gate_proj.weight" for n in gm.graph.nodes)
    got = op_counts(gm)
    assert got["grouped_sdpa"] == 1 and got["kv_append"] == 2  # the plain attention's, now top-level ops
    if built == "before folding":  # that path keeps a few dead mask nodes of the unfolded graph: no snapshot
        return
    path = SNAPSHOTS / "inline-plain-llama-decode.json"
    if os.environ.get("IRC_UPDATE_SNAPSHOTS") == "1":
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert path.is_file(), "no snapshot; run with IRC_UPDATE_SNAPSHOTS=1"
    assert got == json.loads(path.read_text())


@pytest.mark.parametrize("kv_cache", ["static", "copy"])
def test_inlined_decode_equals_the_calls_bit_for_bit(kv_cache, monkeypatch):
    routed = _routed()
    inlined = decoder_for(routed)
    called = _without_inlining(routed, monkeypatch)
    assert "layer0_attn" in _calls(called.gm) and "layer0_attn" not in _calls(inlined.gm)
    rows = [[5, 9, 13, 2, 7, 11, 3], [8, 4, 6], [17, 19, 23, 29, 31]]
    for ids, mask in [left_pad(rows[:1], pad_id=0), left_pad(rows, pad_id=0)]:
        B, T = ids.shape
        capacity = T + 6 if kv_cache == "static" else None
        outs = []
        for decoder in (inlined, called):
            with torch.no_grad():
                m = mask
                logits, past = decoder.step(ids, m, decoder.empty_cache(B, capacity=capacity))
                steps = [logits]
                for _ in range(5):
                    token = steps[-1][:, -1].argmax(-1, keepdim=True)
                    m = torch.cat([m, torch.ones(B, 1, dtype=m.dtype)], dim=1)
                    logits, past = decoder.step(token, m, past)
                    steps.append(logits)
            outs.append((steps, [p.clone() for p in past]))
        (a_steps, a_past), (b_steps, b_past) = outs
        assert all(torch.equal(a, b) for a, b in zip(a_steps, b_steps, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(a_past, b_past, strict=True))


def test_a_graph_without_plain_folds_is_unchanged():
    _, routed = tiny_routed("llama")
    gm = decoder_for(routed).gm
    before = gm.code
    result = inline_plain_folds(gm)
    assert not result.modified and result.stats == {"inlined": 0} and gm.code == before
    assert not any(isinstance(m, FoldedUnit) for m in gm.children())
