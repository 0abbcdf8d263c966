"""Copy a region of a graph into a GraphModule of its own that owns its weights.

Unlike ``fuse_as_graphmodule`` (which turns every weight the region reads into
an input), the outlined module holds its parameters and buffers under short
names (``q_proj.weight`` rather than ``m.model.layers.0.self_attn.q_proj.weight``),
so that a routed unit's code reads like the source and its ``state_dict`` is
self-contained. The region's external inputs become placeholders, in the order
they are first read; its one output is the region's last externally used node.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node


@dataclass
class Outlined:
    module: GraphModule
    inputs: list[Node]  # the original nodes feeding each placeholder, in order
    output: Node | tuple[Node, ...]  # the original node(s) the module's output stands for


def fetch_attr(root: torch.nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def outline(
    gm: GraphModule,
    nodes: list[Node],
    output: Node | tuple[Node, ...],
    *,
    strip_prefix: str | tuple[str, ...] = "",
    class_name: str = "Outlined",
) -> Outlined:
    """Outline ``nodes`` (topologically sorted) whose result is ``output`` (a node or a tuple).

    ``strip_prefix``: the module path(s) taken off weight names, the first that matches.
    """
    prefixes = (strip_prefix,) if isinstance(strip_prefix, str) else strip_prefix
    region = set(nodes)
    graph = Graph()
    env: dict[Node, Node] = {}
    inputs: list[Node] = []
    attrs: dict[str, torch.Tensor] = {}

    def short(target: str) -> str:
        for prefix in prefixes:
            if prefix and target.startswith(prefix + "."):
                return target[len(prefix) + 1 :]
        return target

    def remap(n: Node) -> Node:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            name = short(n.target)
            attrs[name] = fetch_attr(gm, n.target)
            new = graph.get_attr(name)
        else:
            new = graph.placeholder(n.name)
            inputs.append(n)
        new.meta = copy.copy(n.meta)
        env[n] = new
        return new

    for n in nodes:
        if n not in region:
            continue
        env[n] = graph.node_copy(n, remap)
    for o in output if isinstance(output, tuple) else (output,):
        if o not in env:  # a region that returns its input (an identity: a unit without a pre-norm)
            remap(o)
    graph.output(tuple(env[o] for o in output) if isinstance(output, tuple) else env[output])
    module = GraphModule(_AttrRoot(attrs), graph, class_name=class_name)
    graph.lint()
    return Outlined(module, inputs, output)


class _AttrRoot(torch.nn.Module):
    """A root whose dotted attributes become the outlined module's parameters and buffers."""

    def __init__(self, attrs: dict[str, torch.Tensor]):
        super().__init__()
        for name, value in attrs.items():
            owner = self
            *parents, leaf = name.split(".")
            for p in parents:
                if not hasattr(owner, p):
                    owner.add_module(p, torch.nn.Module())
                owner = getattr(owner, p)
            if isinstance(value, torch.nn.Parameter):
                owner.register_parameter(leaf, value)
            else:
                owner.register_buffer(leaf, value)
