"""A routed unit: one attention or MLP unit behind a router, with a forecaster.

Per token, the router decides whether the unit executes or is approximated::

    a      = norm(x)                                   # [B, T, D]
    logits = router(a)                                 # [B, T, 2]  (exec, approx)
    out    = U(a) where executed, F(a) where approximated, 0 on padding

The module returns the unit's contribution; the graph's residual add stays as
captured (``y = x + out``).

Modes (``set_routing`` in ``irc.passes.route_decoder_blocks`` sets them on all units):

- ``dense``: every token executes; equals the un-routed model exactly;
- ``train``: hard Gumbel-softmax decisions with a straight-through gradient,
  temperature ``tau``; dense compute, then blended;
- ``threshold``: execute where ``logit_exec − logit_approx ≥ θ`` (per token, causal);
- ``capacity``: per row, the top ``ceil(c·T)`` tokens by that margin;
- ``mask``: decisions given from outside (``forced_mask``, bool ``[B, T]``).

In ``threshold``, ``capacity`` and ``mask`` the unit runs only on the executed
tokens when ``sparse`` is True (the default); with ``sparse=False`` it computes
densely and blends, the reference the sparse path is tested against. The first
``n_sink`` real tokens of each row always execute, padding never does.

Legend: B batch, T tokens, K executed tokens (Kmax: most in one row), D hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from irc.nn.forecaster import Forecaster
from irc.nn.router import Router
from irc.nn.routing_state import RoutingState
from irc.nn.tokens import (
    ArgRole,
    row_layout,
    sink_mask,
    subset_args,
    top_k_positions,
)
from irc.ops import token_gather, token_scatter


class RoutedUnit(RoutingState):
    def __init__(
        self,
        *,
        kind: str,
        layer: int,
        norm: GraphModule,
        body: GraphModule,
        body_roles: list[ArgRole],
        router: Router,
        forecaster: Forecaster | None,
        n_sink: int,
        kv_policy: str = "keep",
        kv: GraphModule | None = None,
        kv_roles: list[ArgRole] | None = None,
        query: GraphModule | None = None,
        query_roles: list[ArgRole] | None = None,
    ):
        super().__init__()
        self.kind = kind
        self.layer = layer
        self.norm = norm
        self.body = body
        self.body_roles = body_roles
        self.router = router
        self.forecaster = forecaster
        self.n_sink = n_sink
        self.kv_policy = kv_policy
        if kind == "attn":
            self.kv = kv
            self.query = query
        self.kv_roles = kv_roles
        self.query_roles = query_roles
        # training hooks: called in dense mode with (unit, x, a, U(a), attention_mask)
        self.observer = None
        # set by train mode for the loss: soft-differentiable gates and the cos regulariser
        self.last_gate: torch.Tensor | None = None
        self.last_cosreg: torch.Tensor | None = None

    # --- forward ------------------------------------------------------------
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, *extras) -> torch.Tensor:
        a = self.norm(x)  # [B, T, D]
        if self.mode == "dense":
            u = self.body(*self._args(self.body_roles, a, extras))
            if self.observer is not None:
                self.observer(self, x, a, u, attention_mask)
            return u
        pad = attention_mask.bool()  # [B, T], True on real tokens
        sinks = sink_mask(pad, self.n_sink)
        logits = self.router(a)  # [B, T, 2]
        if self.mode == "train":
            return self._train(x, a, extras, logits, pad, sinks)
        if self.traceable and self.mode in ("capacity", "threshold"):
            return self._traceable(a, extras, logits, pad, sinks)
        execute = self._decide(logits, pad, sinks)  # [B, T] bool
        self._count(execute, pad)
        if not self.sparse:
            approx = self._approximate(a, pad & ~execute)  # [B, T, D]
            u = self.body(*self._args(self.body_roles, a, extras, keep=self._keep(execute, pad)))
            return torch.where(execute.unsqueeze(-1), u, approx)
        if bool(execute.all()):  # nothing to skip: no gathers, no scatters
            return self.body(*self._args(self.body_roles, a, extras))
        if self.kind == "mlp":
            rows, u = self._sparse_mlp(a, extras, execute)
        else:
            rows, u = self._sparse_attention(a, extras, execute, pad)
        return self._assemble(a, rows, u, pad & ~execute)

    def _traceable(self, a, extras, logits, pad, sinks):
        """Sparse routing without Python branches on tensor values, for ``torch.export``.

        ``capacity``: every row runs exactly k = ceil(c·T) slots, its top-k tokens by
        margin in position order, so every shape is a function of T; slots that landed
        on padding run too and are discarded. ``threshold``: MLPs run the K executed
        tokens of the flattened batch (K from ``nonzero``); attention runs each row's
        executed tokens first, padded to the busiest row's count Kmax (one data-dependent
        size in [1, T]), the padding slots being other tokens of the row whose
        results are discarded. The forecaster runs densely; both equal the eager path.
        """
        B, T, D = a.shape
        margin = (logits[..., 0] - logits[..., 1]).float() - self.threshold  # [B, T]
        pos = None
        if self.mode == "capacity":
            # the sinks always execute (as in the eager path), even where ceil(c·T) is fewer
            k = torch.sym_max(math.ceil(self.capacity * T), torch.sym_min(self.n_sink, T))
            score = margin.masked_fill(~pad, -math.inf).masked_fill(sinks, math.inf)
            chosen = torch.zeros_like(pad).scatter(1, top_k_positions(score, k), True)  # [B, T], k per row
            pos = _first_positions(chosen, k)  # [B, k], ascending
            execute = chosen & pad  # [B, T]
        else:
            execute = ((margin >= 0) | sinks) & pad  # [B, T]
        approx = self._approximate(a, pad & ~execute).reshape(B * T, D)  # [B·T, D], dense
        flat = a.reshape(B * T, D)
        if pos is None and self.kind == "mlp":
            # a float key: TensorRT's NonZero takes no bool input
            rows = execute.reshape(-1).to(torch.float32).nonzero().squeeze(1)  # [K]
            a_sel = token_gather(flat, rows).unsqueeze(0)  # [1, K, D]
            u = self.body(*self._args(self.body_roles, a_sel, extras, flat=rows.shape[0]))
            return token_scatter(approx, u.reshape(-1, D).to(approx.dtype), rows).view(B, T, D)
        if pos is None:
            # at least one slot: attention over zero queries would need a branch on Kmax == 0
            kmax = execute.sum(dim=1).max().clamp(min=1).item()
            torch._check(kmax >= 1)
            torch._check(kmax <= T)
            pos = _first_positions(execute, kmax)  # [B, Kmax]
        S = pos.shape[1]
        valid = execute.gather(1, pos).reshape(-1, 1)  # [B·S, 1]
        rows = (torch.arange(B, device=a.device).unsqueeze(1) * T + pos).reshape(-1)  # [B·S]
        a_sel = token_gather(flat, rows)  # [B·S, D]
        if self.kind == "mlp":
            u = self.body(*self._args(self.body_roles, a_sel.unsqueeze(0), extras, flat=B * S))
        else:
            k_, v_ = self.kv(*self._args(self.kv_roles, a, extras))
            args = self._args(self.query_roles, a_sel.view(B, S, D), extras, pos=pos,
                              named={"k": k_, "v": v_}, keep=self._keep(execute, pad))
            u = self.query(*args)
        # discarded slots keep what is already there (the forecast, or 0 on padding)
        u = torch.where(valid, u.reshape(B * S, D).to(approx.dtype), token_gather(approx, rows))
        return token_scatter(approx, u, rows).view(B, T, D)

    def _train(self, x, a, extras, logits, pad, sinks):
        # ``gumbel``: set while training on many processes (irc.train.distributed.sharded_gumbel)
        gumbel = getattr(self, "gumbel", None) or F.gumbel_softmax
        g = gumbel(logits.float(), tau=self.tau, hard=True)[..., 0]  # [B, T], straight-through
        g = torch.where(sinks, torch.ones_like(g), g)
        execute = (g > 0.5) & pad
        self._count(execute, pad)
        u = self.body(*self._args(self.body_roles, a, extras, keep=self._keep(execute, pad)))
        f = self._approximate(a, pad)
        real = pad.to(g.dtype)
        self.last_gate = (g, real)
        # tokens the unit changes a lot (low cos(x, x + U(a))) should not be approximated
        with torch.no_grad():
            change = 1 - F.cosine_similarity(x.float(), (x + u).float(), dim=-1)  # [B, T]
        self.last_cosreg = ((1 - g) * change * real).sum() / real.sum().clamp(min=1)
        g = g.to(u.dtype).unsqueeze(-1)
        return g * u + (1 - g) * f

    def _decide(self, logits, pad, sinks) -> torch.Tensor:
        margin = (logits[..., 0] - logits[..., 1]).float() - self.threshold  # [B, T]
        if self.mode == "threshold":
            execute = margin >= 0
        elif self.mode == "capacity":
            T = margin.shape[1]
            k = min(T, math.ceil(self.capacity * T))
            score = margin.masked_fill(~pad, -math.inf).masked_fill(sinks, math.inf)
            top = top_k_positions(score, k)  # [B, k]
            execute = torch.zeros_like(pad).scatter(1, top, True)
        else:  # mask
            if self.forced_mask is None or self.forced_mask.shape != pad.shape:
                got = None if self.forced_mask is None else tuple(self.forced_mask.shape)
                raise ValueError(f"mask mode needs forced_mask of shape {tuple(pad.shape)}, got {got}")
            execute = self.forced_mask.to(device=pad.device, dtype=torch.bool)
        return (execute | sinks) & pad

    def _keep(self, execute, pad):
        """Keys kept under ``kv_policy='drop'``: executed tokens (padding as the model masks it)."""
        return (execute | ~pad) if self.kv_policy == "drop" and self.kind == "attn" else None

    def _approximate(self, a, where) -> torch.Tensor:
        if self.forecaster is None:  # skip: the identity, i.e. no contribution
            return torch.zeros_like(a)
        return self.forecaster(a) * where.unsqueeze(-1).to(a.dtype)

    # --- sparse execution ---------------------------------------------------
    def _assemble(self, a, rows, u, approximated):
        """The unit's output: ``u [K, D]`` at flat positions ``rows [K]``, the forecast at the
        approximated tokens (computed for those only), zero on padding."""
        B, T, D = a.shape
        flat = a.reshape(B * T, D)
        if self.forecaster is not None:
            approx_rows = approximated.reshape(-1).nonzero().squeeze(1)  # [A]
            f = self.forecaster(token_gather(flat, approx_rows))  # [A, D]
            rows = torch.cat([rows, approx_rows])
            u = torch.cat([u, f.to(u.dtype)])
        return token_scatter(torch.zeros_like(flat), u, rows).view(B, T, D)

    def _sparse_mlp(self, a, extras, execute):
        B, T, D = a.shape
        rows = execute.reshape(-1).nonzero().squeeze(1)  # [K], over the batch flattened
        if rows.numel() == 0:
            return rows, a.new_zeros(0, D)
        a_sel = token_gather(a.reshape(B * T, D), rows).unsqueeze(0)  # [1, K, D]
        u = self.body(*self._args(self.body_roles, a_sel, extras, flat=rows.numel()))  # [1, K, D]
        return rows, u.reshape(-1, D)

    def _sparse_attention(self, a, extras, execute, pad):
        B, T, D = a.shape
        k, v = self.kv(*self._args(self.kv_roles, a, extras))  # every token's keys and values
        pos, valid = row_layout(execute)  # [B, Kmax]
        kmax = pos.shape[1]
        if kmax == 0:
            return pos.reshape(-1), a.new_zeros(0, D)
        rows = torch.arange(B, device=a.device).unsqueeze(1) * T + pos  # [B, Kmax] flat positions
        a_sel = token_gather(a.reshape(B * T, D), rows.reshape(-1)).view(B, kmax, D)
        args = self._args(self.query_roles, a_sel, extras, pos=pos, named={"k": k, "v": v},
                          keep=self._keep(execute, pad))
        o = self.query(*args)  # [B, Kmax, D]
        slots = valid.reshape(-1).nonzero().squeeze(1)  # [K]
        return rows.reshape(-1)[slots], token_gather(o.reshape(B * kmax, D), slots)

    def _args(self, roles, hidden, extras, **subset):
        return subset_args(roles, hidden, extras, **subset)

    def extra_repr(self) -> str:
        lff = "none (skip)" if self.forecaster is None else f"rank {self.forecaster.w1.out_features}"
        return (f"layer={self.layer}, kind={self.kind}, mode={self.mode}, n_sink={self.n_sink}, "
                f"kv_policy={self.kv_policy}, lff={lff}")


def _first_positions(selected: torch.Tensor, n) -> torch.Tensor:
    """Per row, the first ``n`` positions in order of a bool ``[B, T]``: selected ones first.

    A stable sort of (not selected), which lowers to one ``TopK`` over T (k = T, a
    function of the input shape; a float key because engines' TopK takes no int8).
    """
    return torch.sort((~selected).to(torch.float32), dim=1, stable=True).indices[:, :n]
