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

A fused q/k/v projection (Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``)
is on both paths: the kv side runs it for every token and the query side runs
it again for the executed tokens, of which it uses the query part only (exact,
not minimal; ``Architecture.attention_query_flops`` counts the extra work).

Eager attention (Gemma2: soft-capped scores, which SDPA cannot express) has no
SDPA node; it is cut the same way at its two products: the keys are the second
operand of the ``matmul`` that produces the scores feeding the one ``softmax``,
the values the second operand of the ``matmul`` that reads the probabilities.

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
_SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default}
_MATMUL = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


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


def _is_4d(p: Node) -> bool:
    return isinstance(p.meta.get("val"), torch.Tensor) and p.meta["val"].dim() == 4


def _core(graph, where: str) -> tuple[Node, Node, list[Node]]:
    """The keys and values the attention's score rows read, and its mask placeholder(s)."""
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target == SDPA]
    if len(sdpas) == 1:
        sdpa = sdpas[0]
        k, v = sdpa.args[1:3]
        mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
        if mask is None or sdpa.kwargs.get("is_causal"):
            raise UserError(f"{where}: attention without an explicit mask ({sdpa.name}) is not supported")
        return k, v, [p for p in _placeholders_above(mask) if _is_4d(p)]
    softmaxes = [n for n in graph.nodes if n.op == "call_function" and n.target in _SOFTMAX]
    if sdpas or len(softmaxes) != 1:
        raise UserError(f"{where}: expected one scaled_dot_product_attention node or one softmax of "
                        f"eager attention, found {len(sdpas)} and {len(softmaxes)}")
    softmax = softmaxes[0]
    scores = _nearest(softmax, lambda n: n.all_input_nodes, _MATMUL)
    weighted = _nearest(softmax, lambda n: list(n.users), _MATMUL)
    if scores is None or weighted is None or len(scores.args) < 2 or len(weighted.args) < 2:
        raise UserError(f"{where}: cannot find the score and value products around {softmax.name}")
    k, v = scores.args[1], weighted.args[1]
    # the mask enters the scores between the two products, not through the keys
    masks = _placeholders_above(softmax) - _placeholders_above(k) - _placeholders_above(scores.args[0])
    return k, v, [p for p in masks if _is_4d(p)]


def _nearest(start: Node, step, targets) -> Node | None:
    seen, todo = set(), list(step(start))
    while todo:
        n = todo.pop(0)
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in targets:
            return n
        todo.extend(step(n))
    return None


def split_attention(attn: GraphModule, where: str) -> AttentionSplit:
    graph = attn.graph
    k, v, mask_inputs = _core(graph, where)
    if len(mask_inputs) != 1:
        raise UserError(f"{where}: cannot tell which input of the attention is its mask")
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
