"""Find every attention and MLP unit of a captured decoder from the graph itself.

A *unit* is a child module of a decoder layer whose output feeds a residual add
in that layer, together with the pre-norm that produces its input::

    x ──▶ [norm nodes] ──▶ a ──▶ [body nodes] ──▶ out ──▶ add(x, out) ──▶ y

The pass reads only ``nn_module_stack`` metadata and data flow: a layer is a
module path with a numeric component (``model.layers.3``), a residual add is an
``add`` owned by the layer itself, the body is the child module that produced
the add's other operand, the norm is the child module that produced the body's
hidden-state input. A body holding ``scaled_dot_product_attention`` is an
attention unit, any other an MLP unit. No model class is named anywhere, so
Llama, Mistral, Qwen2, Qwen3 and SmolLM2 all take the same path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from irc.errors import UserError

_LAYER = re.compile(r"^(.*?\.(\d+))(?:\.|$)")
_ATTENTION_OPS = {
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten._softmax.default,
    torch.ops.aten.softmax.int,
}
_ADDS = {torch.ops.aten.add.Tensor}


@dataclass
class Unit:
    layer: int
    kind: str  # "attn" | "mlp"
    layer_path: str
    path: str  # module path of the body, e.g. "m.model.layers.0.self_attn"
    norm_path: str
    norm_nodes: list[Node]
    body_nodes: list[Node]
    residual: Node  # x: the residual stream entering the unit
    hidden: Node  # a = norm(x): the body's own input
    output: Node  # U(a)
    add: Node  # x + U(a)
    # decode captures (irc.generation.capture): body nodes the graph returns, the
    # attention's concatenated keys and values (the present KV cache), in graph order
    cache_outputs: list[Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"layer{self.layer}.{self.kind}"


def module_path(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _inside(path: str | None, prefix: str) -> bool:
    return path is not None and (path == prefix or path.startswith(prefix + "."))


def _child_of(path: str, layer_path: str) -> str:
    rest = path[len(layer_path) + 1 :]
    return layer_path + "." + rest.split(".")[0]


def _is_activation(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 3


def find_units(gm: GraphModule) -> list[Unit]:
    """Every attention and MLP unit, in graph order. Raises ``UserError`` on a graph it cannot read."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    paths = {n: module_path(n) for n in nodes}
    layers: dict[str, int] = {}
    for p in paths.values():
        m = _LAYER.match(p) if p else None
        if m:
            layers.setdefault(m.group(1), int(m.group(2)))
    if not layers:
        raise UserError("found no decoder layers in the graph (no module path like 'model.layers.0')")
    units: list[Unit] = []
    for layer_path, index in layers.items():
        adds = [
            n for n in nodes
            if n.target in _ADDS and paths[n] == layer_path and _is_activation(n)
            and all(isinstance(a, Node) for a in n.args[:2])
        ]
        if not adds:
            raise UserError(f"layer {index} ({layer_path}): found no residual add")
        for add in adds:
            units.append(_unit_at(add, layer_path, index, nodes, paths))
    return units


def _unit_at(add: Node, layer_path: str, index: int, nodes, paths) -> Unit:
    where = f"layer {index} ({layer_path}), residual add {add.name}"
    a0, a1 = add.args[:2]
    produced = [_inside(paths.get(a), layer_path) and paths.get(a) != layer_path for a in (a0, a1)]
    if produced.count(True) != 1:
        raise UserError(f"{where}: expected exactly one operand produced by a child module of the "
                        f"layer, got {a0.name} and {a1.name}")
    output, residual = (a0, a1) if produced[0] else (a1, a0)
    body_path = _child_of(paths[output], layer_path)
    body = [n for n in nodes if _inside(paths[n], body_path)]
    body_set = set(body)
    hidden_candidates = {
        a for n in body for a in n.all_input_nodes
        if a not in body_set and a.op != "get_attr" and _is_activation(a)
        and _inside(paths.get(a), layer_path) and paths.get(a) != layer_path
    }
    if len(hidden_candidates) != 1:
        names = ", ".join(sorted(a.name for a in hidden_candidates)) or "none"
        raise UserError(f"{where}: the unit {body_path} should take one hidden-state input from a "
                        f"norm in the layer, found: {names}")
    hidden = hidden_candidates.pop()
    norm_path = _child_of(paths[hidden], layer_path)
    norm = [n for n in nodes if _inside(paths[n], norm_path)]
    norm_set = set(norm)
    norm_inputs = {
        a for n in norm for a in n.all_input_nodes if a not in norm_set and a.op != "get_attr"
    }
    if norm_inputs != {residual}:
        names = ", ".join(sorted(a.name for a in norm_inputs))
        raise UserError(f"{where}: the norm {norm_path} should read only the residual stream "
                        f"{residual.name}, it reads: {names}")
    cache_outputs = [n for n in body if n is not output and any(u.op == "output" for u in n.users)]
    for region, out in ((body, output), (norm, hidden)):
        region_set = set(region)
        leaks = [n for n in region if n is not out and n not in cache_outputs
                 and any(u not in region_set for u in n.users)]
        if leaks:
            raise UserError(f"{where}: node {leaks[0].name} of {paths[leaks[0]]} is used outside "
                            "its module; cannot outline the unit")
    if any(u is not add for u in output.users):
        raise UserError(f"{where}: the unit output {output.name} has uses besides the residual add")
    kind = "attn" if any(n.target in _ATTENTION_OPS for n in body) else "mlp"
    if cache_outputs and kind != "attn":
        raise UserError(f"{where}: the MLP {body_path} returns {cache_outputs[0].name} to the graph output; "
                        "only attention units may hold a cache")
    return Unit(index, kind, layer_path, body_path, norm_path, norm, body, residual, hidden, output, add,
                cache_outputs)
