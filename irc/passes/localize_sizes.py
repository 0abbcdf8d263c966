"""Give every module its own copy of the symbolic-size arithmetic it reads.

``torch.export`` computes a size expression such as ``2·B·T`` once and lets every
later module read that one node: in a mixture-of-experts model, layer 1's experts
read ``mul_42``, which layer 0's experts computed. Outlining a unit needs each
node to belong to one unit, and a unit run on a token subset must compute its
sizes from its own inputs (``B·T`` becomes ``1·K``). So each size node read
outside its own module is copied next to it, once per reading module, and the
copy carries the reader's ``nn_module_stack``. Valid because the nodes are pure
integer arithmetic on sizes: a copy computes the same value.

Before::                                   After::

    mul_42 = mul(mul_41, s1)   # layer 0       mul_42 = mul(mul_41, s1)        # layer 0
    arange_5 = arange(mul_42)  # layer 0       mul_42_1 = mul(mul_41_1, s1)    # layer 1
    arange_6 = arange(mul_42)  # layer 1       arange_5 = arange(mul_42)
                                               arange_6 = arange(mul_42_1)
"""

from __future__ import annotations

import copy

import torch
from torch.fx import GraphModule, Node

from irc.passes.result import PassResult


def _is_size(node: Node) -> bool:
    return node.op == "call_function" and isinstance(node.meta.get("val"), torch.SymInt)


def _path(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _within(path: str | None, prefix: str | None) -> bool:
    if prefix is None:
        return True  # a top-level node: every module may read it
    return path is not None and (path == prefix or path.startswith(prefix + "."))


def localize_sizes(gm: GraphModule) -> PassResult:
    copies = 0
    # reverse order: the copies made for a node's readers become readers of its arguments
    for node in reversed(list(gm.graph.nodes)):
        if not _is_size(node) or _path(node) is None or not node.all_input_nodes:
            continue
        if not all(_is_size(a) or a.op == "placeholder" and not isinstance(a.meta.get("val"), torch.Tensor)
                   for a in node.all_input_nodes):
            continue  # a size read off a tensor (sym_size) stays with that tensor
        own = _path(node)
        by_path: dict[str, list[Node]] = {}
        for user in node.users:
            path = _path(user)
            if not _within(path, own):
                by_path.setdefault(path or "", []).append(user)
        for users in by_path.values():
            with gm.graph.inserting_after(node):
                dup = gm.graph.node_copy(node)
            dup.meta = copy.copy(node.meta)
            reader = users[0].meta.get("nn_module_stack")
            if reader:
                dup.meta["nn_module_stack"] = dict(reader)
            else:
                dup.meta.pop("nn_module_stack", None)
            for user in users:
                user.replace_input_with(node, dup)
            copies += 1
    if copies:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(copies), {"size_copies": copies})
