"""Inline the plain folded units of a decode graph: their norm and body ops join the step's graph.

A unit folded ``plain`` (``fold_static_routes``) always runs: it is the unit as
captured, behind a ``FoldedUnit`` call that normalises, checks the decoder's step
hint, picks the body's arguments and calls the body, three module calls per unit
and token. In an eager decode step of a small model those calls are a measurable
share of the step (SmolLM2-135M, a 2-core CPU: 10–30 µs per unit against the
unit's 300–600 µs), and the dense decode graph has none of them: there the same
ops are inline. This pass substitutes each plain unit's norm and body graphs for
its call in the decode graph, so a plain unit costs what the dense model's unit
costs::

    Before::                                           After::

        layer0_mlp = call_module[layer0_mlp](              to_1 = aten.to.dtype(add_3, f32)
            add_3, attention_mask, B, T)                   pow_1 = aten.pow(to_1, 2)   ...   (the norm)
        add_4 = aten.add(add_3, layer0_mlp)                mul_2 = aten.mul(layer0_mlp_norm_weight, to_2)
                                                           layer0_mlp_body_gate_proj_weight = get_attr[
                                                               layer0_mlp.body.gate_proj.weight]
                                                           linear_1 = aten.linear(mul_2, ...)  ...  (the body)
                                                           add_4 = aten.add(add_3, linear_3)

The ``FoldedUnit`` stays registered (not called): the inlined weights are read
through it (``get_attr`` of ``layer0_mlp.body.gate_proj.weight``), so the decoder's
weight and LoRA ties (``irc.generation.decoder._tie``) reach the inlined ops, and
``folded_modules`` still lists the unit. A plain unit's execute counter no longer
counts (it always executes; decoders do not report folded units' counters).

Why this is exact: a plain ``FoldedUnit`` returns ``body(*subset_args(roles,
norm(x), extras))`` for every call (prefill, a batch-1 step, B rows), so the
inlined graph runs the same ops on the same tensors in the same order. Only
decode graphs are rewritten: the prefill graph keeps its units as modules
(training, folding and ``irc inspect`` read them there).
"""

from __future__ import annotations

import logging
import operator

from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from irc.nn.folded_unit import FoldedUnit
from irc.nn.tokens import HIDDEN
from irc.passes.result import PassResult

log = logging.getLogger("irc.passes")


def inline_plain_folds(gm: GraphModule) -> PassResult:
    """Substitute every plain ``FoldedUnit``'s norm and body graphs for its call in ``gm``."""
    inlined = []
    for call in [n for n in gm.graph.nodes if n.op == "call_module"]:
        unit = getattr(gm, call.target, None)
        if not isinstance(unit, FoldedUnit) or unit.how != "plain":
            continue
        if not isinstance(unit.norm, GraphModule) or not isinstance(unit.body, GraphModule):
            continue  # outlined parts are graph modules; anything else stays a call
        x, extras = call.args[0], call.args[2:]
        with gm.graph.inserting_before(call):
            (a,) = _copy_graph(gm, unit.norm, f"{call.target}.norm", [x])
            body_args = [a if role.source == HIDDEN else extras[role.source] for role in unit.body_roles]
            out = _copy_graph(gm, unit.body, f"{call.target}.body", body_args)
        _replace_call(gm, call, out)
        inlined.append(call.target)
    gm.graph.lint()
    gm.recompile()
    log.info("inline_plain_folds: %d plain units inlined", len(inlined))
    return PassResult(gm, bool(inlined), {"inlined": len(inlined)})


def _copy_graph(gm: GraphModule, part: GraphModule, prefix: str, args: list) -> list:
    """Copy ``part``'s nodes into ``gm`` at the insertion point, its placeholders bound to ``args``;
    ``get_attr`` and ``call_module`` targets are re-qualified by ``prefix``. Returns its outputs."""
    placeholders = [n for n in part.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise RuntimeError(f"{prefix} takes {len(placeholders)} inputs, the call gives {len(args)}")
    env: dict[Node, object] = dict(zip(placeholders, args, strict=True))
    outputs = None
    for node in part.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            result = node.args[0]
            outputs = list(result) if isinstance(result, (tuple, list)) else [result]
            outputs = [env[o] if isinstance(o, Node) else o for o in outputs]
        elif node.op in ("get_attr", "call_module"):
            new = gm.graph.create_node(node.op, f"{prefix}.{node.target}", map_arg(node.args, env.__getitem__),
                                       map_arg(node.kwargs, env.__getitem__),
                                       name=f"{prefix.replace('.', '_')}_{node.name}")
            new.meta = dict(node.meta)
            env[node] = new
        else:
            env[node] = gm.graph.node_copy(node, env.__getitem__)
    return outputs


def _replace_call(gm: GraphModule, call: Node, outputs: list) -> None:
    """The call's users read ``outputs``: itself where the body returns one value, its ``getitem``s
    where it returns a tuple (attention: the unit's output and its present keys and values)."""
    if len(outputs) == 1 and not any(u.op == "call_function" and u.target is operator.getitem for u in call.users):
        call.replace_all_uses_with(outputs[0])
    else:
        for user in list(call.users):
            if not (user.op == "call_function" and user.target is operator.getitem):
                raise RuntimeError(f"{call.target}: a tuple-valued unit read other than by getitem ({user.name})")
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
    gm.graph.erase_node(call)
