"""Attend with the KV cache's own heads: no per-step copy of the cache for grouped-query attention.

A grouped-query model (Hkv key/value heads shared by H = n_rep · Hkv query heads)
captures transformers' ``repeat_kv`` before attention: ``unsqueeze → expand →
reshape`` materialises the n_rep-fold keys and values, ``[B, H, L, hd]``, every
step: n_rep times the cache written per layer, more than the cache append itself
(``irc.passes.static_kv_cache``). This pass makes the repeat ``repeat_kv(x, n_rep)``
and the attention ``grouped_sdpa``: run eagerly, ``repeat_kv`` returns the cache
itself and ``grouped_sdpa`` calls ``scaled_dot_product_attention(...,
enable_gqa=True)``, which reads each key/value head for its n_rep query heads
(the CPU flash kernel: no repeat). While tracing (the ONNX decode export) the
attention is written with the heads grouped (``grouped_attention``): the query's n_rep
heads of one key/value head become rows of one matrix, ``[B, Hkv, n_rep · T, hd]``,
multiplied by the keys transposed (``MatMul`` with ``Transpose``, which ONNX
Runtime fuses into ``FusedMatMul(transB)``: no copy) — instead of the exporter's
SDPA lowering over n_rep-fold keys, which every step expands the whole cache
n_rep-fold and then transposes the expanded keys (on SmolLM2, decode at 287
positions: 30 Expand + 30 Transpose of [9, 287, 64] per step, ~8 of 58 ms in
ONNX Runtime's profile). ``expanded_export()`` restores the repeat for an export
(the form of files exported before)::

    Before (a unit's kv part, then its query part)::   After::

        unsqueeze_16 = unsqueeze(cat_3, 2)                 reshape = repeat_kv(cat_3, 2)
        expand_1 = expand(unsqueeze_16, [B, 2, 2, L, 16])
        reshape = reshape(expand_1, [B, 4, L, 16])
        return (reshape, reshape_1, cat_3, cat_4)          return (reshape, reshape_1, cat_3, cat_4)
        ...                                                ...
        sdpa = scaled_dot_product_attention(               sdpa = grouped_sdpa(
            add_6, reshape, reshape_1, expand, scale=.25)      add_6, reshape, reshape_1, expand, scale=.25)

Why this is valid: a repeat is rewritten only where every reader of the repeated
tensor is the key or value argument of a ``scaled_dot_product_attention`` — in the
same graph, or, for a unit's kv part returning it as k / v, in the unit's query
part (``query_roles`` naming ``k`` / ``v``); ``enable_gqa`` is defined as that
repeat (query head h reads key/value head h // n_rep). Other readers (an eager
matmul attention) keep the repeat.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch.fx import GraphModule, Node

from irc.passes.result import PassResult

log = logging.getLogger("irc.passes")

SDPA = torch.ops.aten.scaled_dot_product_attention.default
_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


_EXPANDED = [False]  # expanded_export(): trace the n_rep-fold repeat, as the capture had it


@contextmanager
def expanded_export(enabled: bool = True):
    """Within it, tracing writes ``repeat_kv`` as the captured repeat and ``grouped_sdpa`` as SDPA."""
    before = _EXPANDED[0]
    _EXPANDED[0] = enabled
    try:
        yield
    finally:
        _EXPANDED[0] = before


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``x`` itself, ``[B, Hkv, L, hd]`` (no copy); ``[B, n_rep · Hkv, L, hd]`` when tracing expanded."""
    if not (_EXPANDED[0] and _tracing()):
        return x
    return _expand_heads(x, n_rep)


def _expand_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    B, H, L, D = x.shape
    return x.unsqueeze(2).expand(B, H, n_rep, L, D).reshape(B, H * n_rep, L, D)


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``scaled_dot_product_attention``; keys and values with fewer heads than ``q`` are shared (GQA)."""
    if k.shape[1] == q.shape[1]:
        return SDPA(q, k, v, *args, **kwargs)
    if not _tracing():
        return SDPA(q, k, v, *args, **kwargs, enable_gqa=True)
    return grouped_attention(q, k, v, *args, **kwargs)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                      enable_gqa: bool = True) -> torch.Tensor:
    """SDPA with shared key/value heads as two matmuls over grouped query rows (see the module doc).

    Query head h reads key/value head h // n_rep (``enable_gqa``); a query row with no
    key to attend (left padding) gets zeros, as SDPA's safe softmax gives. A causal flag
    or dropout (no captured decode step has either) takes SDPA over the expanded heads.
    Legend: B batch, H query heads, G = H / Hkv, T queries, S keys, hd head dim.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    if dropout_p or is_causal:
        return SDPA(q, _expand_heads(k, G), _expand_heads(v, G), attn_mask, dropout_p, is_causal, scale=scale)
    scale = D ** -0.5 if scale is None else scale
    rows = (q * scale).reshape(B, Hkv, G * T, D)  # heads j·G … j·G+G-1 read kv head j
    scores = torch.matmul(rows, k.transpose(-1, -2)).reshape(B, Hkv, G, T, S)
    if attn_mask is not None:
        # [B, 1 | H, T, S] -> [B, 1 | Hkv, 1 | G, T, S]
        mask = attn_mask.unsqueeze(1) if attn_mask.shape[1] == 1 else attn_mask.reshape(-1, Hkv, G, T, S)
        if mask.dtype == torch.bool:
            probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)
            probs = probs.masked_fill(~mask, 0.0)  # a row with nothing to attend: zeros, not uniform
        else:
            probs = torch.softmax(scores + mask, dim=-1)
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.reshape(B, Hkv, G * T, S), v)  # [B, Hkv, G·T, hd]
    return out.reshape(B, H, T, D)


def grouped_kv_attention(gm: GraphModule) -> PassResult:
    """Rewrite every ``repeat_kv`` whose readers are attention keys / values (see the module doc)."""
    shared = _query_kv_readers(gm)  # kv part -> its query part, where the query reads k / v by sdpa only
    repeats, attentions = 0, set()
    for module in [m for m in gm.modules() if isinstance(m, GraphModule)]:
        changed = False
        outputs = module.graph.output_node().args[0]
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        for node in list(module.graph.nodes):
            n_rep, x = _repeat(node)
            if n_rep is None:
                continue
            readers = _sdpa_readers(node)
            returned = any(u.op == "output" for u in node.users)
            if readers is None or (returned and not (module in shared and outputs.index(node) < 2)):
                continue
            with module.graph.inserting_after(node):
                call = module.graph.call_function(repeat_kv, (x, n_rep))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            module.graph.erase_node(node)
            attentions.update(readers)
            if returned:
                attentions.update(shared[module])
            repeats += 1
            changed = True
        if changed:
            module.graph.eliminate_dead_code()
    for sdpa in attentions:
        sdpa.target = grouped_sdpa
    touched = {n.graph.owning_module for n in attentions} | {
        m for m in gm.modules() if isinstance(m, GraphModule)
        and any(n.op == "call_function" and n.target is repeat_kv for n in m.graph.nodes)}
    for module in touched:
        module.graph.lint()
        module.recompile()
    log.info("grouped_kv_attention: %d key/value repeats dropped, %d attentions share heads", repeats,
             len(attentions))
    return PassResult(gm, bool(repeats), {"repeats": repeats, "attentions": len(attentions)})


def _repeat(node: Node) -> tuple[int | None, Node | None]:
    """``(n_rep, x)`` if ``node`` is ``reshape(expand(unsqueeze(x, 2), [B, Hkv, n_rep, L, hd]))``."""
    if node.op != "call_function" or node.target not in _RESHAPES:
        return None, None
    expand = node.args[0]
    if not (isinstance(expand, Node) and expand.target == torch.ops.aten.expand.default and len(expand.users) == 1):
        return None, None
    unsqueeze, sizes = expand.args[0], expand.args[1]
    if not (isinstance(unsqueeze, Node) and unsqueeze.target == torch.ops.aten.unsqueeze.default
            and unsqueeze.args[1] == 2 and len(unsqueeze.users) == 1 and len(sizes) == 5):
        return None, None
    n_rep = sizes[2]
    return (n_rep, unsqueeze.args[0]) if isinstance(n_rep, int) and n_rep > 1 else (None, None)


def _sdpa_readers(node: Node) -> list[Node] | None:
    """The attentions reading ``node`` as keys or values; None if anything else reads it."""
    readers = []
    for user in node.users:
        if user.op == "output":
            continue
        if not (user.op == "call_function" and user.target == SDPA and node in user.args[1:3]
                and node is not user.args[0] and node not in user.args[3:] and node not in user.kwargs.values()):
            return None
        readers.append(user)
    return readers


def _query_kv_readers(gm: GraphModule) -> dict[GraphModule, list[Node]]:
    """Per attention unit whose query part reads k and v by sdpa only: kv part -> those attentions."""
    out = {}
    for unit in gm.modules():
        kv, query, roles = getattr(unit, "kv", None), getattr(unit, "query", None), getattr(unit, "query_roles", None)
        if not (isinstance(kv, GraphModule) and isinstance(query, GraphModule) and roles):
            continue
        placeholders = [n for n in query.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(roles):
            continue
        readers = []
        for node, role in zip(placeholders, roles, strict=True):
            if role.source in ("k", "v"):
                found = _sdpa_readers(node)
                if found is None or any(u.op == "output" for u in node.users):
                    readers = None
                    break
                readers += found
        if readers:
            out[kv] = readers
    return out


def _tracing() -> bool:
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()
