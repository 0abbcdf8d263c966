"""The sink-slot cache pass on a tiny decode graph: what it rewrites, and nothing more.

A compacted past has no reader but its folded unit; the past length the model
reads comes from the mask; export's guards see a full-length stand-in. Decoding
with it: tests/generation/test_compact_cache.py.
"""

import operator

import pytest
import torch
from routed_helpers import tiny_routed

from irc.generation.decoder import decoder_for
from irc.passes.compact_sink_caches import SYM_SIZE, compact_sink_caches, full_length_stand_in
from irc.plan import RoutingPlan

from tolerances import ROUTED_EQUAL


@pytest.mark.parametrize("folds, compact", [({"layer0_attn": "forecast"}, [0, 1]),
                                            ({"layer1_attn": "forecast"}, [2, 3]),
                                            ({"layer0_attn": "forecast", "layer1_attn": "forecast"}, [0, 1, 2, 3])])
def test_compacted_pasts_are_read_by_their_unit_only(folds, compact):
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=4))
    routed.fold(folds)
    gm = decoder_for(routed).gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    pasts = placeholders[2:]
    guards = next(n for n in gm.graph.nodes if n.target == "_guards_fn")
    for i, past in enumerate(pasts):
        if i in compact:
            # (the stand-in reads past_0's batch and head sizes only)
            readers = [u.target for u in past.users if u is not guards and u.target is not full_length_stand_in]
            assert readers == [f"layer{i // 2}_attn"] and guards.args[2 + i] is not past
            assert getattr(gm, f"layer{i // 2}_attn").compact
        else:
            assert guards.args[2 + i] is past
    stand_in = {guards.args[2 + i] for i in compact}
    assert len(stand_in) == 1
    (node,) = stand_in
    assert node.target is full_length_stand_in if len(compact) == 4 else node in pasts
    # the model reads the past length P from a full-length past, or, where export had chosen a
    # compacted one, from mask length − T
    from_mask = any(n.target is operator.sub and n.args[0].target == SYM_SIZE and n.args[0].args == (placeholders[1], 1)
                    for n in gm.graph.nodes)
    from_past = any(u.target == SYM_SIZE and u.args[1] == 2 for p in pasts for u in p.users)
    assert from_mask != from_past and (from_mask or len(compact) < 4)
    assert not compact_sink_caches(gm).modified  # idempotent


def test_without_a_guards_function_the_shape_checking_pre_hook_goes():
    """Older torch exports have no ``_guards_fn``: their input pre-hook checks every past against one P."""
    _, routed = tiny_routed("llama", RoutingPlan(lff_rank=16, n_sink=4))
    gm = decoder_for(routed).gm
    gm.graph.erase_node(next(n for n in gm.graph.nodes if n.target == "_guards_fn"))
    delattr(gm, "_guards_fn")
    gm.recompile()
    routed.fold({"layer1_attn": "forecast"})
    decoder = decoder_for(routed)  # folds and compacts this very graph
    assert decoder.gm is gm and decoder.cache_slots() == [None, None, 4, 4]
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = routed(ids)
        _, past = decoder.step(ids[:, :6], torch.ones(1, 6, dtype=torch.long), decoder.empty_cache(1))
        for t in range(6, 9):
            logits, past = decoder.step(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), past)
    assert (logits[:, -1] - want[:, -1]).abs().max() <= ROUTED_EQUAL
