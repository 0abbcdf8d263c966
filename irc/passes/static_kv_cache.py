"""Write the decode graph's KV-cache appends in place (``irc.generation.static_cache``).

The captured decode step appends each layer's new keys and values to the past ones
with ``cat`` and returns the result as the present cache. This pass makes every such
append a call of ``kv_append``, which is that very ``cat`` unless the past is a
prefix view of a preallocated static buffer, where it writes the new positions into
the buffer and returns the longer view (no copy of the past)::

    Before (a unit's kv part)::                     After::

        past_0 = placeholder                            past_0 = placeholder
        cat_3 = aten.cat([past_0, add_7], -2)           cat_3 = kv_append(past_0, add_7, -2)
        unsqueeze_16 = unsqueeze(cat_3, 2)  ...         unsqueeze_16 = unsqueeze(cat_3, 2)  ...
        return (reshape, reshape_1, cat_3, cat_4)       return (reshape, reshape_1, cat_3, cat_4)

An append is a ``cat`` of two tensors whose first is a placeholder of its graph
(the past, passed into the unit) and whose result the graph returns (the present).
Every graph module of the decode graph is rewritten (the root, each unit's body,
kv and query parts), so whichever part a step runs writes in place.

``restore_cat(gm)`` undoes the rewrite, for passes that read the appends as ``cat``
(``fold_static_routes`` finds a folded unit's cache layout there).

Why this is valid: ``kv_append`` returns a tensor equal to the ``cat`` in every case
(the same values, shape and dtype); it only chooses where they live. While tracing
(an ONNX export of the decode graph) it is ``cat``, so exported files do not change.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

from irc.generation.static_cache import kv_append
from irc.passes.result import PassResult

log = logging.getLogger("irc.passes")

CAT = torch.ops.aten.cat.default


def static_kv_cache(gm: GraphModule) -> PassResult:
    """Every KV-cache ``cat`` of the decode graph ``gm`` (and its submodules) becomes ``kv_append``."""
    rewritten: dict[str, int] = {}
    for name, module in gm.named_modules(remove_duplicate=True):
        if not isinstance(module, GraphModule):
            continue
        count = 0
        for node in list(module.graph.nodes):
            if not _is_append(node):
                continue
            (past, new), dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            with module.graph.inserting_after(node):
                call = module.graph.call_function(kv_append, (past, new, dim))
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            module.graph.erase_node(node)
            count += 1
        if count:
            module.graph.lint()
            module.recompile()
            rewritten[name or "<root>"] = count
    log.info("static_kv_cache: %d cache appends write in place (%d graphs)", sum(rewritten.values()), len(rewritten))
    return PassResult(gm, bool(rewritten), {"appends": rewritten})


def _is_append(node) -> bool:
    if node.op != "call_function" or node.target != CAT:
        return False
    tensors = node.args[0]
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2:
        return False
    return tensors[0].op == "placeholder" and any(user.op == "output" for user in node.users)


def restore_cat(gm: GraphModule) -> None:
    """Every ``kv_append`` of ``gm`` back to ``aten.cat``: what later passes recognise as a cache append."""
    for module in gm.modules():
        if not isinstance(module, GraphModule):
            continue
        nodes = [n for n in module.graph.nodes if n.op == "call_function" and n.target is kv_append]
        for node in nodes:
            past, new, dim = node.args
            with module.graph.inserting_after(node):
                cat = module.graph.call_function(CAT, ([past, new], dim))
            cat.meta = dict(node.meta)
            node.replace_all_uses_with(cat)
            module.graph.erase_node(node)
        if nodes:
            module.recompile()
