"""``irc.nn.decode_branches`` run eagerly: the ``torch.cond`` units decode exactly as the sparse path.

The same decode graph, once with Python branches (the sparse path, batch-1 fast
path included) and once with every routed unit behind ``torch.cond`` (what the
ONNX decode export traces): equal logits on a batch-1 prompt and a left-padded
batch of three, at every step, with decisions that go both ways, so the
all-execute, none-execute and gathered (mixed rows) branches all run.
"""

import torch
from routed_helpers import tiny_routed

from irc.generation import left_pad
from irc.generation.decoder import decoder_for
from irc.plan import RoutingPlan


def _decode(decoder, ids, mask, steps=6, hints=True):
    """Logits of the prompt and of ``steps`` greedy steps; the decode units' execute fraction.

    ``hints=False`` calls the graph without the decoder's batch-1 step hints, whose fast path
    would otherwise answer before the branches are reached.
    """
    def step(ids, mask, past):
        if hints:
            return decoder.step(ids, mask, past)
        logits, *present = decoder.gm(ids, mask, *past)
        return logits, present

    decoder.reset_stats()
    out = []
    with torch.no_grad():
        logits, past = step(ids, mask, decoder.empty_cache(ids.shape[0]))
        for _ in range(steps):
            out.append(logits[:, -1])
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            logits, past = step(nxt, mask, past)
    return torch.stack(out), decoder.execute_fraction()


def test_branched_units_decode_as_the_sparse_path():
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=2))
    routed.fold({"layer1_attn": "forecast"})
    routed.set_routing("threshold")
    decoder = decoder_for(routed)
    g = torch.Generator().manual_seed(4)
    one = torch.randint(3, 300, (1, 7), generator=g)
    rows = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 9, 6)]
    try:
        for ids, mask in [(one, torch.ones_like(one)), left_pad(rows, pad_id=2)]:
            want, fraction = _decode(decoder, ids, mask)
            for unit in decoder.units.values():
                unit.branches = True
            got, _ = _decode(decoder, ids, mask, hints=False)
            for unit in decoder.units.values():
                unit.branches = False
            assert 0.0 < fraction < 1.0
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    finally:
        for unit in decoder.units.values():
            unit.branches = False
