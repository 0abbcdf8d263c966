"""The router-training loss: ``CE_LM + w_s·|target − ē| + λ·cosreg``.

- ``CE_LM``: next-token cross-entropy over real tokens;
- ``ē``: the execute fraction over the real tokens, averaged over the routed
  units with the budget's weights (soft through the straight-through Gumbel
  gates, so it carries gradient). Unit sparsity (the paper): equal weights,
  target ``1 − s``. A FLOP budget (``irc.eval.flops.flops_budget``): each unit
  weighted by the FLOPs its execution costs, so the gradient reaching a unit's
  router is proportional to what executing it costs;
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


def routing_terms(units, weights: list[float] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ē, mean cosreg) over the units that recorded gates in their last train-mode forward.

    ``weights`` (one per unit, summing to 1 over all units): ē is their weighted
    sum; ``None``: the plain mean.
    """
    gates, cos, used = [], [], []
    for i, u in enumerate(units):
        state = getattr(u, "last_gate", None)
        if state is None:
            continue
        g, real = state
        gates.append((g * real).sum() / real.sum().clamp(min=1))
        cos.append(u.last_cosreg)
        used.append(i)
        u.last_gate = u.last_cosreg = None
    if not gates:
        return None, None
    if weights is None:
        e_bar = torch.stack(gates).mean()
    else:
        w = torch.tensor([weights[i] for i in used], dtype=gates[0].dtype)
        e_bar = (torch.stack(gates) * w).sum() / w.sum()
    return e_bar, torch.stack(cos).mean()
