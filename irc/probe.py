"""The load-time check that makes a routed model *supported*: dense mode equals the base.

Support is decided by the graph, not by a list of families: the routing pass must
find an attention and an MLP unit in every layer (``irc.passes.find_units``), and
the rewritten graph with every unit executing must compute the base model's
logits on a probe input. A structure the pass misreads without noticing (a unit
outlined from the wrong nodes) changes logits by O(1); reordered float math by
a few ulps. The probe is one forward of 8 tokens through each graph.
"""

from __future__ import annotations

import torch

from irc.errors import UserError

# relative to the largest logit: fp32 reorderings are ~1e-6, bf16/fp16 ~1e-2 at worst
_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}
_RTOL_HALF = 3e-2


def check_dense_equivalence(routed, length: int = 8) -> float:
    """Raise ``UserError`` unless the routed graph in dense mode reproduces the base logits."""
    model = routed.base.model
    vocab = int(model.config.vocab_size)
    ids = (torch.arange(length) * 7 + 3).remainder(min(vocab, 1000)).unsqueeze(0)  # [1, T]
    mask = torch.ones_like(ids)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    modes = {name: u.mode for name, u in routed.units.items()}
    for u in routed.units.values():
        u.set_mode("dense")
    try:
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            got = routed.gm(ids, mask).float()
    finally:
        for name, u in routed.units.items():
            u.set_mode(modes[name])
    scale = float(want.abs().max().clamp(min=1.0))
    diff = float((got - want).abs().max())
    rtol = _RTOL.get(routed.base.dtype, _RTOL_HALF)
    if not diff <= rtol * scale:  # NaN fails too
        raise UserError(f"the routed graph of {routed.arch.family} does not reproduce the base model with every "
                        f"unit executing (max logit difference {diff:.3g}, allowed {rtol * scale:.3g}): the "
                        "routing pass misread this architecture's units; please report it with the model's config")
    return diff
