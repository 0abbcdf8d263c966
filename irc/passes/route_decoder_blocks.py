"""Rewrite the dense decoder units of a captured model into routed units.

For each unit the plan selects (found by ``find_units``), the pass outlines the
unit's pre-norm and its body into modules of their own, wraps them with a router
and a forecaster in a ``RoutedUnit`` (``RoutedLayer`` for the ``mod`` variant,
which routes whole layers), and replaces the region by one ``call_module``.
Attention bodies are further split into a key/value path and a query path
(``split_attention``) so that approximated tokens skip their queries only.

Before::                                   After::

    to_7 ... mul_4 = rmsnorm(x)                layer0_attn = call_module[layer0_attn](
    linear = q_proj(mul_4) ...                     x, attention_mask, cos, sin, mask, B, T)
    sdpa = scaled_dot_product_attention(...)   add_7 = add(x, layer0_attn)
    linear_3 = o_proj(...)
    add_7 = add(x, linear_3)

Every routed module starts in ``dense`` mode, so the rewritten graph computes
exactly what the captured one did until routing is switched on.

The unit structures ``find_units`` reports need little here: a post-norm or a
residual scale is part of the body (the forecaster predicts the scaled,
post-normed term); without a pre-norm the norm module is the identity; the two
units of a parallel layer both take the layer input, and a shared pre-norm is
outlined into each (its nodes are erased with the second); an MoE block is an
MLP body that reads its sizes off its own input, so it runs on the gathered
tokens like any MLP.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node

from irc.errors import UserError
from irc.nn.cached_unit import CachedRoutedUnit
from irc.nn.folded_unit import FoldedUnit
from irc.nn.forecaster import Forecaster
from irc.nn.routed_layer import RoutedLayer
from irc.nn.routed_unit import RoutedUnit
from irc.nn.router import Router
from irc.nn.tokens import HIDDEN, ArgRole, role_of
from irc.passes.find_units import Unit, _inside, find_units, module_path
from irc.passes.localize_sizes import localize_sizes
from irc.passes.outline import outline
from irc.passes.result import PassResult
from irc.passes.split_attention import split_attention
from irc.plan import RoutingPlan

log = logging.getLogger("irc.passes")


def route_decoder_blocks(gm: GraphModule, plan: RoutingPlan) -> PassResult:
    """Replace the units ``plan`` selects by routed modules; returns the modified ``gm``."""
    batch_sym, seq_sym, mask_input = _inputs(gm)
    # outlining needs each size expression owned by one unit (MoE graphs share them across layers)
    localize_sizes(gm)
    units = find_units(gm)
    before = len(gm.graph.nodes)
    routed: list[str] = []
    if plan.variant in ("mod", "static"):
        by_layer: dict[int, list[Unit]] = {}
        for u in units:
            by_layer.setdefault(u.layer, []).append(u)
        replaced: dict[Node, Node] = {}  # a layer's output add → the call that now produces it
        for layer, layer_units in by_layer.items():
            if plan.selects(layer, "layer"):
                routed.append(_route_layer(gm, layer_units, plan, mask_input, batch_sym, seq_sym,
                                           replaced))
    else:
        for u in units:
            if plan.selects(u.layer, u.kind):
                routed.append(_route_unit(gm, u, plan, mask_input, batch_sym, seq_sym))
    if plan.layers is not None:
        missing = sorted(set(plan.layers) - {u.layer for u in units})
        if missing:
            raise UserError(f"the plan names layers {missing}, but the model has layers "
                            f"0..{max(u.layer for u in units)}")
    _drop_unused_weights(gm)
    gm.graph.lint()
    gm.recompile()
    stats = {"units_found": len(units), "routed": routed, "nodes_before": before,
             "nodes_after": len(gm.graph.nodes)}
    log.info("route_decoder_blocks: %d of %d units routed", len(routed), len(units))
    return PassResult(gm, bool(routed), stats)


def _inputs(gm: GraphModule) -> tuple[str, str, Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # a decode capture (irc.generation.capture) adds the past keys and values
    cached = gm.meta.get("irc_capture", {}).get("cache_tensors", 0)
    if len(placeholders) != 2 + cached:
        raise UserError("expected a captured graph with inputs (input_ids, attention_mask); "
                        "capture the model with irc.capture.capture")
    ids, mask = placeholders[:2]
    shape = ids.meta["val"].shape
    return str(shape[0]), str(shape[1]), mask


def _dtype(nodes: list[Node]) -> torch.dtype:
    for n in nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype.is_floating_point:
            return val.dtype
    return torch.float32


def _route_unit(gm, unit: Unit, plan: RoutingPlan, mask_input, batch_sym, seq_sym) -> str:
    where = f"layer {unit.layer} {unit.kind} ({unit.path})"
    # without a pre-norm (Olmo2) the norm is the identity: the body reads the stream itself
    norm = outline(gm, unit.norm_nodes, unit.hidden, strip_prefix=unit.norm_path, class_name="Norm")
    if norm.inputs != [unit.residual]:
        raise UserError(f"{where}: the norm reads more than the residual stream")
    if unit.kind == "mlp":
        _sizes_from_hidden(unit)
    body_output = (unit.output, *unit.cache_outputs) if unit.cache_outputs else unit.output
    # a post-norm lives in a sibling module: its weights are named from the layer
    body = outline(gm, unit.body_nodes, body_output, strip_prefix=(unit.path, unit.layer_path),
                   class_name="Attention" if unit.kind == "attn" else "MLP")
    extras = [n for n in body.inputs if n is not unit.hidden]
    source = {n: (HIDDEN if n is unit.hidden else extras.index(n)) for n in body.inputs}
    split = None
    if unit.kind == "attn":
        split = split_attention(body.module, where)
        mask_ph = split.mask
    body_placeholders = [n for n in body.module.graph.nodes if n.op == "placeholder"]
    ph_source = {ph: source[orig] for ph, orig in zip(body_placeholders, body.inputs, strict=True)}

    def role(ph: Node) -> ArgRole:
        if ph_source[ph] == HIDDEN:
            return ArgRole(HIDDEN, "tokens", (1,))
        return role_of(ph, ph_source[ph], batch_sym, seq_sym, mask=split is not None and ph is mask_ph)

    body_roles = [role(ph) for ph in body_placeholders]
    kv_roles = query_roles = None
    if split is not None:
        kv_roles = [ArgRole(ph_source[n], "full") for n in split.kv.inputs]
        named = {split.k: "k", split.v: "v"}
        query_roles = [ArgRole(named[n], "full") if n in named else role(n) for n in split.query.inputs]
    else:
        stray = [r for r in body_roles if r.kind in ("tokens", "query_mask") and r.source != HIDDEN]
        if stray:
            raise UserError(f"{where}: the MLP reads a per-token input besides its hidden state "
                            f"(extra input {stray[0].source}); cannot run it on a token subset")
    hidden = unit.hidden.meta["val"].shape[-1]
    dtype = _dtype(unit.body_nodes)
    module_class = CachedRoutedUnit if _is_decode(gm) else RoutedUnit
    module = module_class(
        kind=unit.kind,
        layer=unit.layer,
        norm=norm.module,
        body=body.module,
        body_roles=body_roles,
        router=Router(int(hidden), plan.router_width(int(hidden)), dtype),
        forecaster=(Forecaster(int(hidden), plan.lff_rank, dtype, plan.lff_activation)
                    if plan.variant == "informed" else None),
        n_sink=plan.n_sink,
        kv_policy=plan.kv_policy,
        kv=split.kv.module if split else None,
        kv_roles=kv_roles,
        query=split.query.module if split else None,
        query_roles=query_roles,
    )
    module.structure = unit.structure  # what the pass found (irc.passes.find_units), for inspection
    if plan.lora_rank > 0:
        from irc.nn.lora import attach_lora

        parts = {"body": module.body, **({"kv": module.kv, "query": module.query} if split else {})}
        module.lora = attach_lora(module, parts, plan.lora_rank, plan.lora_alpha, plan.lora_targets)
    name = f"layer{unit.layer}_{unit.kind}"
    # a parallel layer's units share their pre-norm: the first one routed leaves it to the other
    _replace(gm, name, module, unit.residual, mask_input, extras, unit.output, unit.add,
             unit.norm_nodes + unit.body_nodes, cache_outputs=unit.cache_outputs, shared=unit.norm_nodes)
    return name


def _sizes_from_hidden(unit: Unit) -> None:
    """Read an MLP's sizes off its own hidden state (an MoE block reads B and T off the mask).

    An MLP runs on a flat token subset ``[1, K, D]``: every size it uses must follow that
    input, so ``sym_size(t, d)`` of a tensor from outside the body becomes the size of the
    hidden state's dimension carrying the same symbol.
    """
    body = set(unit.body_nodes)
    dims = {str(d): i for i, d in enumerate(unit.hidden.meta["val"].shape)}
    for n in unit.body_nodes:
        if n.target != torch.ops.aten.sym_size.int or n.args[0] in body or n.args[0] is unit.hidden:
            continue
        axis = dims.get(str(n.meta.get("val")))
        if axis is not None:
            n.args = (unit.hidden, axis)


def _is_decode(gm: GraphModule) -> bool:
    return bool(gm.meta.get("irc_capture", {}).get("decode"))


def _route_layer(gm, units: list[Unit], plan, mask_input, batch_sym, seq_sym, replaced) -> str:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    units = sorted(units, key=lambda u: order[u.add])
    first = units[0]
    # the layer's output: its last residual add (in a parallel layer, the sum of both terms)
    layer_out = first.layer_output or units[-1].add
    residual = replaced.get(first.residual, first.residual)
    layer_path = first.layer_path
    where = f"layer {first.layer} ({layer_path})"
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and _inside(module_path(n), layer_path)]
    block = outline(gm, nodes, layer_out, strip_prefix=layer_path, class_name="DecoderLayer")
    if residual not in block.inputs:
        raise UserError(f"{where}: the layer does not read the residual stream {residual.name}")
    extras = [n for n in block.inputs if n is not residual]
    placeholders = [n for n in block.module.graph.nodes if n.op == "placeholder"]
    roles = []
    for ph, orig in zip(placeholders, block.inputs, strict=True):
        if orig is residual:
            roles.append(ArgRole(HIDDEN, "tokens", (1,)))
        else:
            is_mask = isinstance(ph.meta.get("val"), torch.Tensor) and ph.meta["val"].dim() == 4
            roles.append(role_of(ph, extras.index(orig), batch_sym, seq_sym, mask=is_mask))
    hidden = int(residual.meta["val"].shape[-1])
    module = RoutedLayer(
        layer=first.layer,
        block=block.module,
        roles=roles,
        router=Router(hidden, plan.router_width(hidden), _dtype(nodes), outputs=1),
        n_sink=plan.n_sink,
        static=plan.variant == "static",
    )
    name = f"layer{first.layer}"
    # the layer returns y itself, so the call replaces the last residual add
    replaced[layer_out] = _replace(gm, name, module, residual, mask_input, extras, layer_out, None, nodes)
    return name


def _replace(gm, name, module, residual, mask_input, extras, output, insert_before, region,
             cache_outputs=(), shared=()):
    gm.add_submodule(name, module)
    anchor = insert_before if insert_before is not None else output
    with gm.graph.inserting_before(anchor):
        call = gm.graph.call_module(name, (residual, mask_input, *extras))
    call.meta["nn_module_stack"] = {name: (name, type(module).__name__)}
    if cache_outputs:  # decode graphs: the call returns (out, *present keys and values)
        call.meta["val"] = (output.meta.get("val"), *(c.meta.get("val") for c in cache_outputs))
        for i, node in enumerate((output, *cache_outputs)):
            with gm.graph.inserting_before(anchor):
                item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(item)
    else:
        call.meta["val"] = output.meta.get("val")
        output.replace_all_uses_with(call)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    shared = set(shared)
    for n in sorted(region, key=order.__getitem__, reverse=True):
        if n.users and n in shared:
            continue  # another unit still reads it
        if n.users:
            raise UserError(f"{name}: node {n.name} is still used by {next(iter(n.users)).name} "
                            "after outlining")
        gm.graph.erase_node(n)
    return call


def _drop_unused_weights(gm: GraphModule) -> None:
    """Erase get_attr nodes nobody reads and the attributes behind them (now owned by routed modules)."""
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            owner_path, _, leaf = n.target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            gm.graph.erase_node(n)
            if hasattr(owner, leaf):
                delattr(owner, leaf)
    gm.delete_all_unused_submodules()


def routed_modules(gm: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The routed units (or layers) of a rewritten model, by name, in graph order."""
    return {name: m for name, m in gm.named_children() if isinstance(m, (RoutedUnit, RoutedLayer))}


def folded_modules(gm: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The folded units of a rewritten model (``fold_static_routes``), by name, in graph order."""
    return {name: m for name, m in gm.named_children() if isinstance(m, FoldedUnit)}


def set_routing(gm: torch.nn.Module, mode: str, *, sparse: bool = True, tau: float | None = None,
                capacity: float | None = None, masks: dict | None = None, record: bool | None = None) -> None:
    """Set the routing mode (and its settings) of every routed module in ``gm``.

    Folded units have no mode (a compile-time specialisation): they take ``record`` only.
    """
    for m in folded_modules(gm).values():
        m.set_mode(mode)  # validates the mode; a folded unit ignores it
        if record is not None:
            m.record = record
    for name, m in routed_modules(gm).items():
        m.set_mode(mode)
        m.sparse = sparse
        if tau is not None:
            m.tau = tau
        if capacity is not None:
            m.capacity = capacity
        if record is not None:
            m.record = record
        if masks is not None:
            m.forced_mask = masks.get(name)
