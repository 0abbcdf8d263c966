"""The router-training loss: ``CE_LM + w_s·|(1 − s) − ē| + λ·cosreg``.

- ``CE_LM``: next-token cross-entropy over real tokens;
- ``ē``: the mean execute fraction over the routed units and the real tokens
  (soft through the straight-through Gumbel gates, so it carries gradient);
- ``cosreg``: per unit, the mean over real tokens of ``(1 − g) · (1 − cos(x, x + U(a)))``:
  approximating a token the unit changes a lot is penalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose target is a real token."""
    target_real = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    pred = logits[:, :-1][target_real].float()
    return F.cross_entropy(pred, ids[:, 1:][target_real])


def routing_terms(units) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ē, mean cosreg) over the units that recorded gates in their last train-mode forward."""
    gates, cos = [], []
    for u in units:
        state = getattr(u, "last_gate", None)
        if state is None:
            continue
        g, real = state
        gates.append((g * real).sum() / real.sum().clamp(min=1))
        cos.append(u.last_cosreg)
        u.last_gate = u.last_cosreg = None
    if not gates:
        return None, None
    return torch.stack(gates).mean(), torch.stack(cos).mean()
