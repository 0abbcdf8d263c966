"""Drop dtype conversions that convert nothing, eval-mode dropouts, and tensor-metadata asserts.

Why this is valid: ``x.to(torch.float32)`` on a float32 tensor returns ``x``
itself, so eager code that later reads ``x`` and code that reads the
conversion's result see one tensor. ``torch.export`` records the conversion and,
because the object is the same, routes *every later use of x* through the
conversion node. In an fp32 Llama the residual add then reads the first node
of the next RMSNorm (``add(to_7, o_proj)``), which hides the residual stream
from unit discovery. Replacing such a node by its input restores the data flow
of the source. ``_assert_tensor_metadata`` nodes only re-check dtypes the
capture already fixed. ``dropout(x, p, train=False)`` returns ``x``: Phi-3,
StableLM and GPT-NeoX wrap each unit's output in a dropout module, which would
otherwise stand between the unit and its residual add.

Before::                              After::

    to_7 = aten.to.dtype(emb, f32)        pow_1 = aten.pow(emb, 2)
    pow_1 = aten.pow(to_7, 2)             ...
    ...                                   add_7 = aten.add(emb, linear_3)
    add_7 = aten.add(to_7, linear_3)
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from irc.passes.result import PassResult

_CONVERSIONS = {
    torch.ops.aten.to.dtype,
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten.to.device,
    torch.ops.aten._to_copy.default,
}
_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}
_DROPOUTS = {torch.ops.aten.dropout.default}


def _is_eval_dropout(node: Node) -> bool:
    if node.target not in _DROPOUTS or not node.args or not isinstance(node.args[0], Node):
        return False
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    return train is False


def _is_noop(node: Node) -> bool:
    if node.target not in _CONVERSIONS or not node.args or not isinstance(node.args[0], Node):
        return False
    if node.kwargs.get("copy") or (len(node.args) > 3 and node.args[3] is True):
        return False
    src, dst = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
        return False
    return src.dtype == dst.dtype and src.device == dst.device and src.layout == dst.layout


def drop_noop_conversions(gm: GraphModule) -> PassResult:
    dropped = asserts = dropouts = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS:
            gm.graph.erase_node(node)
            asserts += 1
        elif _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped += 1
        elif _is_eval_dropout(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropouts += 1
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(dropped or asserts or dropouts),
                      {"conversions": dropped, "asserts": asserts, "dropouts": dropouts})
