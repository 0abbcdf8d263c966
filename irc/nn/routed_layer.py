"""Mixture-of-Depths (the ``mod`` baseline): whole decoder layers, top-k tokens per row.

A scalar router weight ``r = router(x)`` per token chooses which tokens pass
through the layer; the others go around it untouched. Selected tokens only see
each other inside the layer (the layer runs on the selected subsequence, with
their original positions), and their update is scaled by ``w = sigmoid(r)``::

    y = x + w · (layer(x̃) − x)   for selected tokens,   y = x   otherwise

The scale carries the router's gradient in training. Modes as for
``RoutedUnit``: ``dense`` runs every token through the layer unscaled (equal to
the un-routed model), ``capacity`` takes the top ``ceil(c·T)`` per row (the MoD
rule), ``threshold`` selects ``r ≥ θ``, ``mask`` takes decisions from outside,
``train`` selects by capacity and computes densely with keys restricted to the
selected tokens. The first ``n_sink`` real tokens are always selected.

With ``static=True`` (the ShortGPT baseline) the layer is dropped for every
token in every mode but ``dense``.

Legend: B batch, T tokens, K selected tokens (Kmax: most in one row), D hidden.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule

from irc.nn.router import Router
from irc.nn.routing_state import RoutingState
from irc.nn.tokens import (
    ArgRole,
    gather_rows,
    row_layout,
    sink_mask,
    subset_args,
    top_k_positions,
)
from irc.ops import token_gather, token_scatter


class RoutedLayer(RoutingState):
    kind = "layer"

    def __init__(self, *, layer: int, block: GraphModule, roles: list[ArgRole], router: Router, n_sink: int,
                 static: bool = False):
        super().__init__()
        self.static = static  # ShortGPT: outside dense mode the layer is dropped for every token
        self.layer = layer
        self.block = block
        self.roles = roles
        self.router = router
        self.n_sink = n_sink
        self.forecaster = None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, *extras) -> torch.Tensor:
        if self.mode == "dense":
            return self.block(*self._args(x, extras))
        if self.static:
            if self.record:
                self.tokens += int(attention_mask.sum())
            return x
        pad = attention_mask.bool()  # [B, T]
        r = self.router(x)[..., 0].float()  # [B, T]
        select = self._decide(r, pad, sink_mask(pad, self.n_sink))
        self._count(select, pad)
        w = torch.sigmoid(r).to(x.dtype).unsqueeze(-1)  # [B, T, 1]
        if self.mode == "train" or not self.sparse:
            y = self.block(*self._args(x, extras, keep=select | ~pad))
            return torch.where(select.unsqueeze(-1), x + w * (y - x), x)
        return self._sparse(x, extras, select, w)

    def _decide(self, r, pad, sinks) -> torch.Tensor:
        if self.mode in ("capacity", "train"):
            T = r.shape[1]
            k = min(T, math.ceil(self.capacity * T))
            score = r.masked_fill(~pad, -math.inf).masked_fill(sinks, math.inf)
            select = torch.zeros_like(pad).scatter(1, top_k_positions(score, k), True)
        elif self.mode == "threshold":
            select = r >= self.threshold
        else:
            if self.forced_mask is None or self.forced_mask.shape != pad.shape:
                raise ValueError(f"mask mode needs forced_mask of shape {tuple(pad.shape)}")
            select = self.forced_mask.to(device=pad.device, dtype=torch.bool)
        return (select | sinks) & pad

    def _sparse(self, x, extras, select, w):
        B, T, D = x.shape
        pos, valid = row_layout(select)  # [B, Kmax]
        kmax = pos.shape[1]
        if kmax == 0:
            return x
        rows = torch.arange(B, device=x.device).unsqueeze(1) * T + pos  # [B, Kmax]
        x_sel = token_gather(x.reshape(B * T, D), rows.reshape(-1)).view(B, kmax, D)
        y = self.block(*self._args(x_sel, extras, pos=pos, valid=valid))  # [B, Kmax, D]
        w_sel = gather_rows(w, 1, pos)  # [B, Kmax, 1]
        y = x_sel + w_sel * (y - x_sel)
        slots = valid.reshape(-1).nonzero().squeeze(1)
        y = token_gather(y.reshape(B * kmax, D), slots)
        return token_scatter(x.reshape(B * T, D), y, rows.reshape(-1)[slots]).view(B, T, D)

    def _args(self, hidden, extras, *, pos=None, valid=None, keep=None):
        return subset_args(self.roles, hidden, extras, pos=pos, valid=valid, keep=keep, keys_selected=True)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, mode={self.mode}, n_sink={self.n_sink}, static={self.static}"
