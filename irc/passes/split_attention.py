"""Split an outlined attention unit into its key/value path and its query path.

Approximated tokens still produce keys and values (later tokens attend to
them), but skip their query, score row and ``o_proj``. The outlined attention is
cut at the ``scaled_dot_product_attention`` node:

- ``kv``: everything the key and value operands depend on, run on all T tokens;
  returns ``(k, v)``;
- ``query``: everything the output depends on, given ``k`` and ``v`` as inputs;
  run on the executed tokens only (its hidden state, rotary tables and mask rows
  gathered, its sequence-length inputs set to the number gathered).

Nodes both paths need (e.g. ``cos.unsqueeze(1)``, used by the rotary embedding
of q and of k) are copied into both, so each side computes its own version at
its own token count. Why this is exact: attention is row-wise in its queries;
each query row reads all keys and values, which the kv side computes for every
token, so the query rows of the executed tokens equal the same rows of the
dense computation.

Before (one module)::                 After (two modules)::

    q = rope(q_proj(a), cos, sin)         kv(a, cos, sin) -> (k, v)
    k = rope(k_proj(a), cos, sin)         query(a_sel, cos_sel, sin_sel,
    v = v_proj(a)                               mask_rows, K, k, v)
    o = sdpa(q, k, v, mask)                 = o_proj(sdpa(q_sel, k, v, mask_rows))
    return o_proj(o)

A decode capture's attention also returns its present keys and values (the past
ones concatenated with the new tokens'): they depend on the key/value path only,
so ``kv`` returns them too, ``(k, v, *present)``, computed for every new token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from irc.errors import UserError
from irc.passes.outline import Outlined, outline

SDPA = torch.ops.aten.scaled_dot_product_attention.default


@dataclass
class AttentionSplit:
    kv: Outlined  # inputs: placeholders of the attention module
    query: Outlined  # inputs: placeholders of the attention module, and the k / v nodes
    k: Node
    v: Node
    mask: Node  # the attention module's placeholder that becomes the score mask


def _closure(roots: list[Node], stop: set[Node]) -> set[Node]:
    seen: set[Node] = set()
    todo = [r for r in roots if r not in stop]
    while todo:
        n = todo.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        todo.extend(a for a in n.all_input_nodes if a not in stop)
    return seen


def _placeholders_above(node: Node) -> set[Node]:
    found, seen, todo = set(), set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.add(n)
        todo.extend(n.all_input_nodes)
    return found


def split_attention(attn: GraphModule, where: str) -> AttentionSplit:
    graph = attn.graph
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target == SDPA]
    if len(sdpas) != 1:
        raise UserError(f"{where}: expected one scaled_dot_product_attention node, found {len(sdpas)} "
                        "(load the model with the default 'sdpa' attention implementation)")
    sdpa = sdpas[0]
    q, k, v = sdpa.args[:3]
    mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
    if mask is None or sdpa.kwargs.get("is_causal"):
        raise UserError(f"{where}: attention without an explicit mask ({sdpa.name}) is not supported")
    mask_inputs = [p for p in _placeholders_above(mask)
                   if isinstance(p.meta.get("val"), torch.Tensor) and p.meta["val"].dim() == 4]
    if len(mask_inputs) != 1:
        raise UserError(f"{where}: cannot tell which input of {sdpa.name} is the attention mask")
    output = graph.output_node().args[0]
    cache: tuple[Node, ...] = ()
    if isinstance(output, tuple):  # decode capture: (out, *present keys and values)
        output, *rest = output
        cache = tuple(rest)
    order = {n: i for i, n in enumerate(graph.nodes)}
    kv_nodes = sorted(_closure([k, v, *cache], set()), key=order.__getitem__)
    q_nodes = sorted(_closure([output], {k, v}), key=order.__getitem__)
    leaked = [n for n in cache if n in q_nodes]
    if leaked:
        raise UserError(f"{where}: the cache output {leaked[0].name} depends on the query path")
    return AttentionSplit(
        kv=outline(attn, kv_nodes, (k, v, *cache), class_name="AttentionKV"),
        query=outline(attn, q_nodes, output, class_name="AttentionQuery"),
        k=k,
        v=v,
        mask=mask_inputs[0],
    )
