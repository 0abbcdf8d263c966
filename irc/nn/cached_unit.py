"""A routed unit of the decode-step graph: routing with a KV cache.

The decode capture (``irc.generation.capture``) gives each routed unit the new
tokens' residual stream ``x [B, T, D]`` and the mask of the past and new tokens
``attention_mask [B, P+T]``; an attention unit's body also reads the past keys
and values and returns the present ones::

    attn:  (out [B, T, D], k_0 [B, Hkv, P+T, hd], v_0 [...])      mlp:  out [B, T, D]

Routing is the prefill unit's, per token and causal, so a decode step routes
every new token exactly as prefill of the whole sequence routes it there:

- the sinks are the first ``n_sink`` real tokens of the whole row (past included);
- every new token writes its keys and values (the ``kv`` part runs on all T
  tokens, approximated ones included), the ``query`` part runs on the executed
  tokens only;
- ``kv_policy="drop"``: the keys each layer dropped are remembered across steps
  (``keep``), so the mask of a later step masks them as prefill would.

Fast paths, no gathers or scatters: a step where every token executes runs the
unit as captured; a step where none does runs only the forecaster (attention:
and the kv part). At batch 1 and T = 1 every step takes one of the two, and the
decoder hands every unit a ``StepHint`` (is the new token real, how many real
tokens precede it), so a unit's routing work is its router, one margin and one
Python branch (``_one_token``): the decode step's cost is dominated by the
number of ops, not their size. A one-token step of several rows where some rows
execute (``_some_rows``): an MLP runs on every row and blends (its weights are read
once whether it runs for one row or for B, so gathers would cost more than they
save); attention runs its query part on the executing rows only, since attending
over the cache costs per row.
For such steps the decoder hands every unit a ``RowsHint`` (which rows' new tokens
are real, which are sinks), so a unit's routing work is its router, the decision,
one read of the B decisions and the branch (``_one_token_rows``). Both fast paths run
the router and forecaster through ``irc.nn.small_linear`` (in bf16 on the CPU, outside
oneDNN, whose per-call setup outweighs these products at one token).

``branches`` (set by the ONNX decode export): threshold routing behind
``torch.cond`` instead of Python branches, so the exported graph holds ``If``
nodes that skip the work (``irc.nn.decode_branches``).

The routers, forecasters and thresholds are the prefill units' own modules and
tensors (``irc.generation.decoder`` ties them), so there is one set of weights.

Legend: B batch, T new tokens, P past tokens, K executed tokens (Kmax: most in one row), D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from irc.nn.decode_branches import gathered_rows, routed_step
from irc.nn.margin import executes
from irc.nn.routed_unit import RoutedUnit
from irc.nn.tokens import row_layout, sink_mask
from irc.ops import token_gather


@dataclass(frozen=True)
class StepHint:
    """Facts about a batch-1, one-new-token step that every unit would otherwise recompute."""

    mask_len: int  # P + 1: the hint belongs to the call whose attention_mask has this length
    real: bool  # the new token is a real token (not padding)
    real_before: int  # real tokens before it: it is a sink iff real_before < n_sink


@dataclass(frozen=True)
class RowsHint:
    """Facts about a one-new-token step of B rows that every unit would otherwise recompute."""

    mask_len: int  # P + 1: the hint belongs to the call whose attention_mask has this length
    real: torch.Tensor  # [B, 1] bool: the row's new token is real (not padding)
    real_before: torch.Tensor  # [B, 1]: real tokens before it (a sink iff fewer than n_sink)
    n_real: int  # real new tokens, sum(real)
    fewest_before: int  # the least real_before of a row whose new token is real (no new sink iff ≥ n_sink)

    @staticmethod
    def of(attention_mask: torch.Tensor) -> RowsHint:
        row = attention_mask != 0  # [B, P + 1]
        real = row[:, -1:]
        before = row[:, :-1].sum(dim=1, keepdim=True)
        n_real = int(real.sum())
        fewest = int(before[real].min()) if n_real else row.shape[1]
        return RowsHint(mask_len=row.shape[1], real=real, real_before=before, n_real=n_real, fewest_before=fewest)

    def sinks(self, n_sink: int) -> torch.Tensor:
        """``[B, 1]``: the new token is one of its row's first ``n_sink`` real tokens (``sink_mask``)."""
        return self.real & (self.real_before < n_sink)


class CachedRoutedUnit(RoutedUnit):
    cached = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # kv_policy="drop": which past tokens are keys of this layer, [B, P] (None: all of them)
        self.keep: torch.Tensor | None = None
        self.step_hint: StepHint | RowsHint | None = None  # set by the decoder around each one-token step
        # threshold routing behind torch.cond (ONNX If) rather than Python branches: the ONNX decode export
        self.branches = False
        # the ONNX decode export collects every unit's decisions [B, T] here, in graph order (a file output)
        self.decisions: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, *extras):
        hint = self.step_hint
        if (hint is not None and self.mode == "threshold" and self.sparse and self.kv_policy == "keep"
                and x.shape[1] == 1 and attention_mask.shape[1] == hint.mask_len):
            if isinstance(hint, StepHint) and hint.real and x.shape[0] == 1:
                return self._one_token(x, extras, hint)
            if isinstance(hint, RowsHint) and x.shape[0] == hint.real.shape[0] and not self.branches:
                return self._one_token_rows(x, extras, hint)
        T = x.shape[1]
        full = attention_mask.bool()  # [B, P+T]
        pad = full[:, full.shape[1] - T:]  # [B, T], True on real new tokens
        a = self.norm(x)  # [B, T, D]
        if self.mode == "dense":
            self.keep = None
            return self.body(*self._args(self.body_roles, a, extras))
        if self.mode == "train":
            raise ValueError("the decode graph does not train; train the prefill graph")
        sinks = sink_mask(full, self.n_sink)[:, full.shape[1] - T:]  # [B, T]
        logits = self.router(a)  # [B, T, 2]
        execute = self._decide(logits, pad, sinks)  # [B, T] bool
        self._count(execute, pad)
        if self.decisions is not None:
            self.decisions.append(execute)
        keep = self._step_keep(execute, pad, full)
        if self.branches and self.mode == "threshold" and keep is None:
            return routed_step(self, a, extras, execute, pad)
        if not self.sparse:  # dense compute, then blend: branch-free (what ONNX export traces)
            approx = self._approximate(a, pad & ~execute)
            out = self.body(*self._args(self.body_roles, a, extras, keep=keep))
            u, cache = (out[0], out[1:]) if self.kind == "attn" else (out, ())
            return self._with_cache(torch.where(execute.unsqueeze(-1), u, approx), cache)
        if keep is None and bool(execute.all()):  # nothing to skip: the unit as captured
            return self.body(*self._args(self.body_roles, a, extras))
        if T == 1 and keep is None and bool(execute.any()):  # a decode step of several rows, some executing
            return self._some_rows(a, extras, execute, self._approximate(a, pad & ~execute))
        if self.kind == "mlp":
            if not bool(execute.any()):
                return self._approximate(a, pad)
            rows, u = self._sparse_mlp(a, extras, execute)
            return self._assemble(a, rows, u, pad & ~execute)
        k, v, *cache = self.kv(*self._args(self.kv_roles, a, extras))  # every new token's keys and values
        if not bool(execute.any()):
            return self._with_cache(self._approximate(a, pad), cache)
        rows, u = self._cached_query(a, extras, execute, k, v, keep)
        return self._with_cache(self._assemble(a, rows, u, pad & ~execute), cache)

    def _one_token(self, x, extras, hint: StepHint):
        """Threshold routing of one real new token at batch 1: the decision is one Python bool."""
        a = self.norm(x)  # [1, 1, D]
        logits = self.router.logits(a)  # [1, 1, 2]
        exec_logit, approx_logit = logits.view(2).tolist()
        # _decide's margin ≥ 0 with its roundings, in Python floats (irc.nn.margin)
        execute = hint.real_before < self.n_sink or executes(exec_logit, approx_logit, self._theta(), logits.dtype)
        if self.record:
            self.executed += int(execute)
            self.tokens += 1
        if execute:
            return self.body(*self._args(self.body_roles, a, extras))
        forecast = self.forecaster.step(a) if self.forecaster is not None else torch.zeros_like(a)
        if self.kind == "mlp":
            return forecast
        k, v, *cache = self.kv(*self._args(self.kv_roles, a, extras))  # the token's keys and values
        return self._with_cache(forecast, cache)

    def _one_token_rows(self, x, extras, hint: RowsHint):
        """Threshold routing of one new token in each of B rows: the general path's ops for T = 1,
        minus what the hint already knows (padding, sinks) and with one read of the decisions."""
        a = self.norm(x)  # [B, 1, D]
        execute = self._decide(self.router.logits(a), hint.real, hint.sinks(self.n_sink))  # [B, 1]
        flags = execute.view(-1).tolist()
        executed = sum(flags)
        if self.record:
            self.executed += executed
            self.tokens += hint.n_real
        if executed == len(flags):  # nothing to skip: the unit as captured
            return self.body(*self._args(self.body_roles, a, extras))
        if executed == 0:
            forecast = self._forecast_rows(a, hint.real)
            if self.kind == "mlp":
                return forecast
            k, v, *cache = self.kv(*self._args(self.kv_roles, a, extras))  # every row's keys and values
            return self._with_cache(forecast, cache)
        return self._some_rows(a, extras, execute, self._forecast_rows(a, hint.real & ~execute))

    def _some_rows(self, a, extras, execute, approx):
        """A one-token step of B rows where some rows execute (``execute [B, 1]``), the forecast
        ``approx [B, 1, D]`` elsewhere. An MLP runs every row and blends: its weights are read once
        for one row or for B, so gathering the executing rows would cost more than it saves.
        Attention runs its kv part on every row (each new token writes its keys and values) and its
        query part on the executing rows only (``gathered_rows``): the query's attention over the
        cache costs per row, unlike its weights, and outweighs the gathers (``bench/decode_speed.py``,
        B = 8 on SmolLM2-135M: a 100-ms step 6 ms faster)."""
        if self.kind == "mlp":
            u = self.body(*self._args(self.body_roles, a, extras))
            return torch.where(execute.unsqueeze(-1), u, approx)
        k, v, *cache = self.kv(*self._args(self.kv_roles, a, extras))  # every row's keys and values
        return self._with_cache(gathered_rows(self, a, extras, {"k": k, "v": v}, execute, approx), cache)

    def _forecast_rows(self, a, where):
        """``_approximate`` for a decode step's few rows (``Forecaster.step``)."""
        if self.forecaster is None:
            return torch.zeros_like(a)
        return self.forecaster.step(a) * where.unsqueeze(-1).to(a.dtype)

    def _theta(self) -> float:
        """θ's fp32 value as a Python float, re-read only when the buffer changed (calibration writes
        it in place)."""
        version = (id(self.threshold), self.threshold._version)
        if getattr(self, "_theta_version", None) != version:
            self._theta_value = float(self.threshold.float().item())
            self._theta_version = version
        return self._theta_value

    def _cached_query(self, a, extras, execute, k, v, keep):
        B, T, D = a.shape
        if B == 1 and bool(execute.all()):  # kv_policy="drop" at batch 1: no gathers either
            o = self.query(*self._args(self.query_roles, a, extras, named={"k": k, "v": v}, keep=keep))
            return torch.arange(T, device=a.device), o.reshape(T, D)
        pos, valid = row_layout(execute)  # [B, Kmax]
        kmax = pos.shape[1]
        rows = torch.arange(B, device=a.device).unsqueeze(1) * T + pos  # [B, Kmax] flat positions
        a_sel = token_gather(a.reshape(B * T, D), rows.reshape(-1)).view(B, kmax, D)
        args = self._args(self.query_roles, a_sel, extras, pos=pos, named={"k": k, "v": v}, keep=keep)
        o = self.query(*args)  # [B, Kmax, D]
        slots = valid.reshape(-1).nonzero().squeeze(1)  # [K]
        return rows.reshape(-1)[slots], token_gather(o.reshape(B * kmax, D), slots)

    def _step_keep(self, execute, pad, full) -> torch.Tensor | None:
        """``kv_policy="drop"``: the keys of this layer, past and new, ``[B, P+T]``; else None."""
        if self.kv_policy != "drop" or self.kind != "attn":
            return None
        B, T = execute.shape
        P = full.shape[1] - T
        past = self.keep
        if past is None or tuple(past.shape) != (B, P):  # a dense prefill: every past token is a key
            past = torch.ones(B, P, dtype=torch.bool, device=full.device)
        keep = torch.cat([past, execute | ~pad], dim=1)  # padding: as the model masks it
        self.keep = keep
        return keep

    def _with_cache(self, out, cache):
        return (out, *cache) if self.kind == "attn" else out
