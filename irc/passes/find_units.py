"""Find every attention and MLP unit of a captured decoder from the graph itself.

A *unit* is the chain of a decoder layer's child modules that turns the residual
stream into one term of a residual add owned by the layer::

    x ──▶ [pre-norm] ──▶ a ──▶ [body ──▶ post-norm] ──▶ [· scale] ──▶ out ──▶ add(…, out)

The pass reads only ``nn_module_stack`` metadata and data flow. A layer is a
module path with a numeric component (``model.layers.3``); its residual adds are
the ``add`` nodes the layer itself owns. Each operand of such an add is either
the stream (produced outside the layer's child modules: the previous layer, the
embedding, an earlier add of this layer) or a *term*: walking back from a term
through the layer's own single-input nodes (a residual scale) and then from
module to module (each reading one hidden-state-shaped tensor) until the stream
is reached gives the chain. Its leading module is the pre-norm when it holds no
matrix product (Olmo2 has none: the unit reads the stream itself); the rest is
the body, a trailing norm included (Gemma2/3, Olmo2 post-norms). A body holding
attention is an attention unit, any other an MLP unit.

The structures this covers, recorded per unit in ``Unit.structure``:

- ``pre-norm`` / ``no-pre-norm``: whether a norm module feeds the body;
- ``post-norm``: a norm after the body, before the add;
- ``residual-scale``: the layer scales the term (Granite's ``residual_multiplier``);
- ``parallel``: two units of the layer read the same stream (GPT-NeoX, Cohere,
  parallel StableLM); the terms are added in any order;
- ``moe``: the body picks experts per token (a ``topk``): Mixtral, Qwen3-MoE;
- ``fused-qkv`` / ``fused-gate-up``: one projection feeds the query and the
  keys (Phi-3, GPT-NeoX) or the gate and the up path (Phi-3, GLM).

No model class is named anywhere. A graph outside these structures stops with a
``UserError`` naming the layer, the node and what was expected.
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
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_ADDS = {torch.ops.aten.add.Tensor}
_MATMULS = {
    torch.ops.aten.linear.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.matmul.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.einsum.default,
    _SDPA,
}
_TOPK = {torch.ops.aten.topk.default}
_SPLITS = {
    torch.ops.aten.chunk.default,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.narrow.default,
    torch.ops.aten.unbind.int,
}


@dataclass
class Unit:
    layer: int
    kind: str  # "attn" | "mlp"
    layer_path: str
    path: str  # module path of the body, e.g. "m.model.layers.0.self_attn"
    norm_path: str  # "" when the unit reads the stream itself (no pre-norm)
    norm_nodes: list[Node]
    body_nodes: list[Node]
    residual: Node  # x: the residual stream the unit reads (a parallel layer's units read one)
    hidden: Node  # a = norm(x): the body's own input (x itself without a pre-norm)
    output: Node  # U(a): the term added to the stream
    add: Node  # the residual add that consumes U(a)
    # decode captures (irc.generation.capture): body nodes the graph returns, the
    # attention's concatenated keys and values (the present KV cache), in graph order
    cache_outputs: list[Node] = field(default_factory=list)
    structure: tuple[str, ...] = ()  # see the module docstring
    layer_output: Node | None = None  # the layer's last residual add (its output)

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


def _shape(node: Node) -> tuple[str, ...] | None:
    val = node.meta.get("val")
    return tuple(str(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def _is_size(node: Node) -> bool:
    return not isinstance(node.meta.get("val"), torch.Tensor)


class _Layer:
    """One decoder layer's nodes, and the walks over them."""

    def __init__(self, layer_path: str, index: int, nodes: list[Node], paths: dict[Node, str | None]):
        self.path, self.index, self.nodes, self.paths = layer_path, index, nodes, paths
        self.adds = [
            n for n in nodes
            if n.target in _ADDS and paths[n] == layer_path and _is_activation(n)
            and all(isinstance(a, Node) for a in n.args[:2])
        ]
        self.order = {n: i for i, n in enumerate(nodes)}

    def where(self, node: Node) -> str:
        return f"layer {self.index} ({self.path}), node {node.name}"

    def owned(self, node: Node) -> bool:
        return self.paths.get(node) == self.path

    def child(self, node: Node) -> str | None:
        """The child module of the layer that produced ``node`` (None: the layer itself or outside)."""
        p = self.paths.get(node)
        if p is None or p == self.path or not _inside(p, self.path):
            return None
        return _child_of(p, self.path)

    def region(self, module: str) -> list[Node]:
        return [n for n in self.nodes if _inside(self.paths[n], module)]

    def hidden_input(self, region: list[Node], shape, module: str) -> Node:
        """The one hidden-state-shaped tensor a module reads from outside itself."""
        inside = set(region)
        found = {a for n in region for a in n.all_input_nodes
                 if a not in inside and a.op != "get_attr" and _shape(a) == shape}
        if len(found) != 1:
            names = ", ".join(sorted(a.name for a in found)) or "none"
            raise UserError(f"layer {self.index} ({self.path}): the module {module} should read one "
                            f"hidden state of the residual stream's shape, it reads: {names}")
        return found.pop()

    def scale_input(self, node: Node, shape) -> Node | None:
        """For a node the layer owns that scales one hidden state (``x · m``): that hidden state."""
        if node.target in _ADDS:
            return None
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr" and not _is_size(a)]
        hidden = [a for a in inputs if _shape(a) == shape]
        if len(hidden) != 1 or len(inputs) != 1:
            return None
        return hidden[0]


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
    for layer_path, index in sorted(layers.items(), key=lambda item: item[1]):
        layer = _Layer(layer_path, index, [n for n in nodes if _inside(paths[n], layer_path)], paths)
        if not layer.adds:
            raise UserError(f"layer {index} ({layer_path}): found no residual add")
        here: list[Unit] = []
        for add in layer.adds:
            terms = [a for a in add.args[:2] if a not in layer.adds and _is_term(layer, a, _shape(add))]
            if not terms and not any(a in layer.adds for a in add.args[:2]):
                raise UserError(f"{layer.where(add)}: a residual add with no unit among its operands "
                                f"({add.args[0].name}, {add.args[1].name})")
            here += [_unit_at(layer, add, term) for term in terms]
        kinds = sorted(u.kind for u in here)
        if kinds != ["attn", "mlp"]:
            found = ", ".join(f"{u.kind} {u.path} (ending in {u.output.name})" for u in here)
            raise UserError(f"layer {index} ({layer_path}): expected one attention and one MLP unit, "
                            f"found {found}")
        readers: dict[Node, int] = {}
        for u in here:
            readers[u.residual] = readers.get(u.residual, 0) + 1
        for u in here:
            if readers[u.residual] > 1:
                u.structure = (*u.structure, "parallel")
            u.layer_output = layer.adds[-1]
        units += sorted(here, key=lambda u: layer.order[u.output])
    return units


def _is_term(layer: _Layer, node: Node, shape) -> bool:
    """Whether an add operand is a unit's output (else it is the residual stream)."""
    while layer.owned(node):
        up = layer.scale_input(node, shape)
        if up is None:
            return False
        node = up
    return layer.child(node) is not None


def _unit_at(layer: _Layer, add: Node, output: Node) -> Unit:
    where = layer.where(add)
    shape = _shape(add)
    structure: list[str] = []
    # the layer's own nodes between the last module and the add (a residual scale)
    post: list[Node] = []
    node = output
    while layer.owned(node):
        post.append(node)
        node = layer.scale_input(node, shape)
    if post:
        structure.append("residual-scale")
    # walk back module by module until the stream
    chain: list[tuple[str, list[Node]]] = []
    between: list[Node] = []  # layer-owned scale nodes between two modules
    seen: set[str] = set()
    while True:
        module = layer.child(node)
        if module is None or module in seen:
            break
        seen.add(module)
        region = layer.region(module)
        chain.insert(0, (module, region))
        node = layer.hidden_input(region, shape, module)
        while layer.owned(node) and node not in layer.adds:
            up = layer.scale_input(node, shape)
            if up is None:
                break
            between.append(node)
            node = up
    stream = node
    if layer.child(stream) is not None:
        raise UserError(f"{where}: the module {layer.child(stream)} feeds the unit twice")
    if not chain:
        raise UserError(f"{where}: the term {output.name} is produced by no module of the layer")
    first_is_norm = not any(n.target in _MATMULS for n in chain[0][1])
    if first_is_norm and len(chain) == 1:
        raise UserError(f"{where}: the term {output.name} is a norm of the stream ({chain[0][0]}), "
                        "not a unit")
    if first_is_norm:
        (norm_path, norm), body_modules = chain[0], chain[1:]
        hidden = layer.hidden_input(body_modules[0][1], shape, body_modules[0][0])
        structure.insert(0, "pre-norm")
    else:
        norm_path, norm, body_modules = "", [], chain
        hidden = stream
        structure.insert(0, "no-pre-norm")
    if len(body_modules) > 1 and not any(n.target in _MATMULS for n in body_modules[-1][1]):
        structure.append("post-norm")
    body_set = {n for _, region in body_modules for n in region} | set(post) | set(between)
    body = sorted(body_set, key=layer.order.__getitem__)
    path = body_modules[0][0]
    if not first_is_norm and hidden not in {a for n in body for a in n.all_input_nodes}:
        raise UserError(f"{where}: the unit {path} does not read the stream {stream.name}")
    norm_set = set(norm)
    norm_inputs = {a for n in norm for a in n.all_input_nodes
                   if a not in norm_set and a.op != "get_attr" and not _is_size(a)}
    if norm and norm_inputs != {stream}:
        names = ", ".join(sorted(a.name for a in norm_inputs))
        raise UserError(f"{where}: the norm {norm_path} should read only the residual stream "
                        f"{stream.name}, it reads: {names}")
    cache_outputs = [n for n in body if n is not output and any(u.op == "output" for u in n.users)]
    for region, out in ((body, output), (norm, hidden)):
        region_set = set(region)
        leaks = [n for n in region if n is not out and n not in cache_outputs and not _is_size(n)
                 and any(u not in region_set for u in n.users)]
        if leaks:
            user = next(u for u in leaks[0].users if u not in region_set)
            raise UserError(f"{where}: node {leaks[0].name} of {layer.paths[leaks[0]]} is used outside "
                            f"its module (by {user.name}); cannot outline the unit")
    if any(u is not add for u in output.users):
        raise UserError(f"{where}: the unit output {output.name} has uses besides the residual add")
    kind = "attn" if _is_attention(body) else "mlp"
    if cache_outputs and kind != "attn":
        raise UserError(f"{where}: the MLP {path} returns {cache_outputs[0].name} to the graph output; "
                        "only attention units may hold a cache")
    structure += _body_structure(body, kind)
    return Unit(layer.index, kind, layer.path, path, norm_path, norm, body, stream, hidden, output, add,
                cache_outputs, tuple(structure))


def _is_attention(body: list[Node]) -> bool:
    # a softmax without SDPA is eager attention, unless it scores experts (an MoE gate picks top-k)
    if any(n.target == _SDPA for n in body):
        return True
    return any(n.target in _ATTENTION_OPS for n in body) and not any(n.target in _TOPK for n in body)


def _ancestors(node: Node, stop: Node) -> set[Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n is stop or n.op != "call_function":
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _body_structure(body: list[Node], kind: str) -> list[str]:
    tags = []
    if any(n.target in _TOPK for n in body):
        tags.append("moe")
    body_set = set(body)
    projections = [n for n in body if n.target == torch.ops.aten.linear.default]
    if kind == "attn":
        sdpa = next((n for n in body if n.target == _SDPA), None)
        if sdpa is not None:
            q_side = _ancestors(sdpa.args[0], sdpa) & set(projections)
            k_side = _ancestors(sdpa.args[1], sdpa) & set(projections)
            if q_side & k_side:
                tags.append("fused-qkv")
    elif "moe" not in tags:
        # one projection whose output is split into the gate and the up path
        for p in projections:
            if sum(1 for u in p.users if u.target in _SPLITS and u in body_set) >= 1 and \
                    p.args[0] is not None and all(u.target in _SPLITS for u in p.users):
                tags.append("fused-gate-up")
                break
    return tags
