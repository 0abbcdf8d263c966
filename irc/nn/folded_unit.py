"""A folded unit: a routed unit whose route was found constant, compiled without a router.

``fold_static_routes`` replaces a ``RoutedUnit`` whose tokens (almost) all took one
path on held-in data by one of two specialisations, keeping its outlined parts and
its forecaster (the same modules and weights)::

    plain:     out = U(a)                                   every token executes
    forecast:  out = U(a) on the sinks, F(a) elsewhere, 0 on padding

with ``a = norm(x)``. There is no router, no threshold decision and no data-dependent
token count: the sinks (the first ``n_sink`` real tokens of each row, which a routed
unit always executes) sit in a fixed number of slots, S = min(n_sink, T) per row.

Forecast attention needs no keys, values or query path for the non-sink tokens: a
sink attends to the real tokens before it, which are all sinks, so the ``kv`` and
``query`` parts run on the S sink slots only (their attention mask gathered on both
axes; slots of rows with fewer real tokens than S are masked as keys and their
results dropped). In the decode graph (``cache`` set) the sinks attend to the
past sinks too. The cache has one of two layouts:

- full length (as captured): past [B, Hkv, P, hd], present [B, Hkv, P+T, hd], the
  new non-sink tokens' keys and values being zeros that no query ever reads (only
  sinks query this layer, and they come before every non-sink token);
- sink slots (``compact``, set by ``irc.passes.compact_sink_caches``): past
  [B, Hkv, min(n_sink, P), hd], present [B, Hkv, min(n_sink, P+T), hd], slot j of
  row b holding row b's j-th real token, zeros (masked) past a row's real tokens.
  The keys' positions in the attention mask are looked up from the mask.

In eager decoding a step with no new sink runs no part of the unit but the norm
and the forecaster (a sink-slot cache is returned as it came). A traced graph
runs the S = min(n_sink, T) slots every step and discards them (at T = 1: one
token's unit, the price of a branch-free decode graph), unless ``branches`` is
set: the sink-slot work then sits behind ``torch.cond`` on "any new sink"
(an ONNX ``If``, ``irc.nn.decode_branches``).

A folded unit is a compile-time specialisation: it ignores the routing mode
(``set_routing`` only sets its ``record`` flag) and its ``threshold`` buffer. Its
counters count real tokens as routed units do, the sinks as executed.

Legend: B batch, T (new) tokens, P past tokens, S sink slots per row (new tokens), C past cache slots
(P, or min(n_sink, P) when compact), N present sink slots (min(n_sink, P+T)), D hidden.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from irc.generation.static_cache import kv_append
from irc.nn.cached_unit import RowsHint, StepHint
from irc.nn.decode_branches import folded_step
from irc.nn.forecaster import Forecaster
from irc.nn.routing_state import RoutingState
from irc.nn.tokens import ArgRole, gather_rows, restrict_keys, sink_mask, subset_args
from irc.ops import token_gather, token_scatter

HOWS = ("forecast", "plain")
CONTEXT = "context"  # a kv input that is the key count P + T (decode graphs): becomes P + S


class FoldedUnit(RoutingState):
    def __init__(
        self,
        *,
        kind: str,
        layer: int,
        how: str,
        norm: GraphModule,
        body: GraphModule,
        body_roles: list[ArgRole],
        forecaster: Forecaster | None,
        n_sink: int,
        kv: GraphModule | None = None,
        kv_roles: list[ArgRole] | None = None,
        query: GraphModule | None = None,
        query_roles: list[ArgRole] | None = None,
        cache: tuple[tuple[int, int], ...] | None = None,
    ):
        super().__init__()
        if how not in HOWS:
            raise ValueError(f"how must be one of {', '.join(HOWS)}, got {how!r}")
        self.kind = kind
        self.layer = layer
        self.how = how
        self.norm = norm
        self.body = body
        self.body_roles = body_roles
        self.router = None
        self.forecaster = forecaster if how == "forecast" else None
        self.n_sink = n_sink
        if kind == "attn":
            self.kv = kv
            self.query = query
        # roles of the kv part's inputs restricted to the sink slots (tokens, seq, CONTEXT)
        self.kv_roles = kv_roles
        self.query_roles = query_roles
        # decode graphs: per present key/value output of kv, (extra input holding the past, cat axis)
        self.cache = cache
        self.step_hint = None  # irc.nn.cached_unit.StepHint (batch-1 steps) or RowsHint, set by the decoder
        self.compact = False  # decode graphs: the cache holds the sink slots only (compact_sink_caches)
        self.branches = False  # traced: the sink-slot work behind torch.cond (ONNX If), irc.nn.decode_branches
        self.mode = "folded"

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, *extras):
        a = self.norm(x)  # [B, T, D]
        T = a.shape[1]
        hint = self._hint(attention_mask, T)
        if hint is not None:  # one new token at batch 1, in eager decoding: no mask work at all
            return self._one_token(a, extras, hint)
        rows = self._rows_hint(attention_mask, T)
        if rows is not None:  # one new token in each of B rows, none a sink: no mask work either
            return self._one_token_rows(a, extras, rows)
        P = attention_mask.shape[1] - T  # past tokens (0 in prefill graphs)
        if self.how == "plain":
            if self._counting():
                pad = attention_mask[:, P:].bool()
                self._count(pad, pad)
            return self.body(*subset_args(self.body_roles, a, extras))
        full = attention_mask.bool()  # [B, P+T]
        pad = full[:, P:]  # [B, T], True on real (new) tokens
        sinks = sink_mask(full, self.n_sink)[:, P:]  # [B, T]
        if self._counting():
            self._count(sinks, pad)
        out = self._forecast(a, pad & ~sinks)  # [B, T, D]
        if self.n_sink == 0 or (self._eager() and not bool(sinks.any())):
            return self._with_cache(out, self._cache_without_sinks(extras, P + T, T))
        if self.branches and not self._eager():
            return folded_step(self, a, out, full, sinks, extras)
        return self._sinks(a, out, full, sinks, extras)

    def _one_token(self, a, extras, hint):
        """A batch-1 step of one token; ``hint`` says whether it is real and whether it is a sink."""
        executed = self.how == "plain" or (hint.real and hint.real_before < self.n_sink)
        if self.record and hint.real:
            self.executed += int(executed)
            self.tokens += 1
        if executed:
            return self.body(*subset_args(self.body_roles, a, extras))
        out = self._forecast(a, None) if hint.real else torch.zeros_like(a)
        return self._with_cache(out, self._cache_without_sinks(extras, hint.mask_len, 1))

    def _one_token_rows(self, a, extras, hint: RowsHint):
        """A step of one new token in each of B rows, none of them a sink (``_rows_hint``)."""
        if self.record:
            self.executed += hint.n_real if self.how == "plain" else 0
            self.tokens += hint.n_real
        if self.how == "plain":
            return self.body(*subset_args(self.body_roles, a, extras))
        out = self._forecast(a, None if hint.n_real == a.shape[0] else hint.real)
        return self._with_cache(out, self._cache_without_sinks(extras, hint.mask_len, 1))

    # --- forecast -----------------------------------------------------------
    def _sinks(self, a, out, full, sinks, extras):
        """``out`` with the sinks' rows replaced by the unit run on the sink slots only."""
        B, T, D = a.shape
        # the first S positions of each row, sinks first in order (a stable sort: one TopK)
        order = torch.sort((~sinks).to(torch.float32), dim=1, stable=True).indices  # [B, T]
        pos = order.index_select(1, torch.arange(torch.sym_min(self.n_sink, T), device=a.device))  # [B, S]
        S = pos.shape[1]
        valid = sinks.gather(1, pos)  # [B, S]
        rows = (torch.arange(B, device=a.device).unsqueeze(1) * T + pos).reshape(-1)  # [B·S]
        flat = out.reshape(B * T, D)
        a_sel = token_gather(a.reshape(B * T, D), rows).view(B, S, D)
        cache = ()
        if self.kind == "mlp":
            u = self.body(*subset_args(self.body_roles, a_sel, extras, pos=pos))  # [B, S, D]
        else:
            u, cache = self._sink_attention(a_sel, extras, pos, valid, full, T)
        # slots that hold no sink keep what is there (the forecast, or 0 on padding)
        u = torch.where(valid.reshape(-1, 1), u.reshape(B * S, D).to(flat.dtype), token_gather(flat, rows))
        return self._with_cache(token_scatter(flat, u, rows).view(B, T, D), cache)

    def _sink_attention(self, a_sel, extras, pos, valid, full, T):
        B, S = pos.shape
        P = full.shape[1] - T  # past tokens (0 in prefill graphs)
        C = 0 if self.cache is None else extras[self.cache[0][0]].shape[self.cache[0][1]]  # past slots held
        args = subset_args(self.kv_roles, a_sel, extras, pos=pos)
        args = [C + S if r.kind == CONTEXT else v for r, v in zip(self.kv_roles, args, strict=True)]
        k, v, *present = self.kv(*args)  # keys and values of the past slots and the sink slots: [B, H, C+S, hd]
        keys, kept = pos, valid  # [B, S]: which positions of the mask's key axis k and v hold
        if self.cache is not None:
            if self.compact:
                past, past_kept = self._past_sinks(full[:, :P], C)  # [B, C]
            else:
                past = torch.arange(P, device=pos.device).unsqueeze(0).expand(B, P)  # [B, P]
                past_kept = torch.ones_like(past, dtype=torch.bool)
            keys = torch.cat([past, P + pos], dim=1)  # [B, C+S]
            kept = torch.cat([past_kept, valid], dim=1)
        args = subset_args(self.query_roles, a_sel, extras, pos=pos, named={"k": k, "v": v})
        for i, role in enumerate(self.query_roles):
            if role.kind == "query_mask":  # rows gathered by subset_args; now the key axis
                mask = args[i]
                args[i] = restrict_keys(gather_rows(mask, mask.dim() - 1, keys), kept)
        o = self.query(*args)  # [B, S, D]
        cache = ()
        for p, (_, axis) in zip(present, self.cache or (), strict=True):
            cache += (self._compacted(p, past_kept, valid, P + T, axis) if self.compact else
                      self._widen(p, pos, valid, P, T, axis),)
        return o, cache

    def _past_sinks(self, past_mask, C):
        """Positions ``[B, C]`` in the mask of the past sinks a sink-slot cache holds, and which slots hold one.

        Slot j holds the row's j-th real past token (``past_mask [B, P]``, True on real tokens).
        """
        order = torch.sort((~past_mask).to(torch.float32), dim=1, stable=True).indices  # [B, P] real first
        keys = order.index_select(1, torch.arange(C, device=past_mask.device))  # [B, C]
        return keys, past_mask.gather(1, keys)

    def _compacted(self, present, past_kept, valid, context, axis):
        """A present cache tensor (C past slots, then the S new slots) as N = min(n_sink, P+T) sink slots:
        each row's valid past slots, then its new sinks, then zeros."""
        B, C = past_kept.shape
        S = valid.shape[1]
        j = torch.arange(torch.sym_min(self.n_sink, context), device=valid.device).unsqueeze(0)  # [1, N]
        held = past_kept.sum(dim=1, keepdim=True)  # [B, 1] valid past slots: a prefix of the C
        total = held + valid.sum(dim=1, keepdim=True)  # [B, 1] the new sinks are a prefix of the S slots
        index = torch.where(j < held, j, C + j - held).clamp(max=C + S - 1)  # [B, N] into the C + S
        slots = present.dim() * [1]  # [B, 1, N, 1] for the usual axis 2
        slots[0], slots[axis] = B, j.shape[1]
        shape = list(present.shape)
        shape[0], shape[axis] = B, j.shape[1]
        out = present.gather(axis, index.view(slots).expand(shape))
        return out.masked_fill(~(j < total).view(slots), 0)

    def _widen(self, present, pos, valid, P, T, axis):
        """A present cache tensor (past, then the S slots) at full length: past, then T new rows
        holding the sinks' keys or values and zeros elsewhere."""
        B, S = pos.shape
        slots = present.dim() * [1]  # [B, 1, S, 1] for the usual axis 2
        slots[0], slots[axis] = B, S
        new = present.narrow(axis, P, S)
        new = torch.where(valid.view(slots), new, torch.zeros_like(new))
        shape = list(new.shape)
        shape[axis] = T
        wide = new.new_zeros(shape).scatter(axis, pos.view(slots).expand_as(new), new)
        return torch.cat([present.narrow(axis, 0, P), wide], dim=axis)

    def _cache_without_sinks(self, extras, context, T) -> tuple:
        """A step without new sinks: the past, and zeros for the T new tokens (never read); a sink-slot
        cache as it came (zero slots appended only while P < n_sink: rows of padding)."""
        if self.cache is None:
            return ()
        cache = []
        for source, axis in self.cache:
            past = extras[source]
            shape = list(past.shape)
            if not self.compact:
                shape[axis] = T
            elif self._eager():
                shape[axis] = min(self.n_sink, context) - past.shape[axis]
            else:  # traced (behind an If): N = min(n_sink, P+T) slots, the past's then zeros, by shape alone
                shape[axis] = torch.sym_min(self.n_sink, context)
                cache.append(torch.cat([past, past.new_zeros(shape)], dim=axis).narrow(axis, 0, shape[axis]).contiguous())
                continue
            cache.append(past if self.compact and shape[axis] == 0 else  # a static cache: written in place
                         kv_append(past, past.new_zeros(shape), axis))
        return tuple(cache)

    def _forecast(self, a, where) -> torch.Tensor:
        """The forecast where ``where [B, T]`` (every token if None), 0 elsewhere."""
        if self.forecaster is None:  # a skip model: approximated tokens take the identity
            return torch.zeros_like(a)
        one_token = a.shape[1] == 1 and self._eager()  # a decode step's few rows (Forecaster.step)
        f = self.forecaster.step(a) if one_token else self.forecaster(a)
        return f if where is None else f * where.unsqueeze(-1).to(a.dtype)

    # --- helpers ------------------------------------------------------------
    def _hint(self, attention_mask, T):
        """The decoder's ``StepHint`` when it belongs to this call (and branching is allowed)."""
        hint = self.step_hint
        if (not isinstance(hint, StepHint) or T != 1 or tuple(attention_mask.shape) != (1, hint.mask_len)
                or not self._eager()):
            return None
        if self.compact and self.how == "forecast" and hint.real and hint.real_before < self.n_sink:
            return None  # a new sink with a sink-slot cache: the body would read the past as full length
        return hint

    def _rows_hint(self, attention_mask, T) -> RowsHint | None:
        """The decoder's ``RowsHint`` when it belongs to this call and the step has no new sink."""
        hint = self.step_hint
        if (not isinstance(hint, RowsHint) or T != 1 or tuple(attention_mask.shape) != (hint.real.shape[0], hint.mask_len)
                or hint.fewest_before < self.n_sink or not self._eager()):
            return None
        return hint

    def _eager(self) -> bool:
        """Python branches on tensor values are allowed (not exporting, not asked to trace)."""
        return not (self.traceable or torch.compiler.is_exporting())

    def _counting(self) -> bool:
        return self.record and self._eager()  # counters read tensor values

    def _with_cache(self, out, cache):
        return (out, *cache) if self.cache is not None else out

    def set_mode(self, mode: str) -> None:
        """Folded units have no routing mode: validated, then ignored."""
        super().set_mode(mode)
        self.mode = "folded"

    def extra_repr(self) -> str:
        lff = "none (skip)" if self.forecaster is None else f"rank {self.forecaster.w1.out_features}"
        return (f"layer={self.layer}, kind={self.kind}, folded={self.how}, n_sink={self.n_sink}, "
                f"lff={lff if self.how == 'forecast' else '-'}, cached={self.cache is not None}"
                f"{', cache=sink slots' if self.compact else ''}")
