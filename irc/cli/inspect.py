"""``irc inspect MODEL``: the routed graph as a table, a diff, code and a drawing."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show the routed graph: units, FLOPs, graph diff, code, drawing",
        description="Route MODEL (or open a routed model directory) and show, per layer, its "
        "units, router and forecaster sizes and FLOPs per token dense vs routed at --sparsity; "
        "the op-count diff of the graph before and after the routing pass; the code of one "
        "routed unit; and, with --dot, a drawing of it.",
    )
    p.add_argument("model", help="routed model directory, Hugging Face directory, .gguf, or smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.25,
                   help="fraction of tokens approximated, for the FLOP columns (default 0.25)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length for attention FLOPs")
    p.add_argument("--layer", type=int, default=0, help="the layer whose routed unit is shown (default 0)")
    p.add_argument("--unit", choices=["attn", "mlp"], default="attn", help="which unit of --layer to show")
    p.add_argument("--variant", choices=["informed", "skip", "mod"], default="informed",
                   help="routing variant when MODEL is a base model (default informed)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    p.add_argument("--dot", metavar="FILE", help="draw the shown unit to FILE (.svg, or .dot for DOT text)")
    p.add_argument("--no-code", action="store_true", help="do not print the unit's code")
    p.add_argument("--prompt", metavar="TEXT", help="the text whose routing --heatmap draws")
    p.add_argument("--heatmap", metavar="FILE",
                   help="draw tokens × units routing decisions for --prompt to FILE (.png or .svg), with each "
                        "unit's execute fraction on held-in data; routed model directories only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import irc
    from irc.cli.common import emit_json, fmt_int, info
    from irc.errors import UserError
    from irc.inspect.draw import write_drawing
    from irc.inspect.summary import node_diff, unit_parts, unit_table
    from irc.plan import RoutingPlan
    from irc.routing import is_routed_dir

    if not 0.0 <= args.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.dot and not args.dot.endswith((".svg", ".dot")):
        raise UserError(f"--dot writes .svg or .dot files, got {args.dot}")
    if args.dot:
        from irc.cache import check_output

        check_output(args.dot, flag="--dot")
    if args.heatmap or args.prompt:
        _check_heatmap_args(args)
    start = time.perf_counter()
    if is_routed_dir(args.model):
        routed = irc.load(args.model, dtype=args.dtype)
    else:
        routed = irc.route(irc.load_model(args.model, dtype=args.dtype), RoutingPlan(variant=args.variant))
    rows = unit_table(routed, args.sparsity, args.seq_len)
    dense = sum(r.dense_flops for r in rows) + routed.arch.head_flops()
    after = sum(r.routed_flops for r in rows) + routed.arch.head_flops()
    diff = node_diff(routed)
    name = f"layer{args.layer}" if routed.plan.variant == "mod" else f"layer{args.layer}_{args.unit}"
    unit = routed.units.get(name, routed.folded.get(name))
    if unit is None:
        raise UserError(f"no routed unit {name}; routed units: {', '.join(list(routed.units)[:6])}...")
    drawn = write_drawing(unit, args.dot, f"{name} of {args.model}") if args.dot else None
    heat = _heatmap(routed, args) if args.heatmap else None
    plan = routed.plan
    if args.json:
        emit_json({
            "model": args.model, "plan": plan.to_dict(), "sparsity": args.sparsity, "seq_len": args.seq_len,
            "units": [r.__dict__ for r in rows], "routed_units": len(routed.units),
            "folded_units": {n: u.how for n, u in routed.folded.items()},
            "flops_per_token": {"dense": dense, "routed": after, "saved": 1 - after / dense},
            "recorded": _recorded(routed),
            "nodes": {"captured": routed.capture_nodes, "top_level": len(routed.gm.graph.nodes)},
            "diff": [{"op": op, "before": b, "after": a} for op, b, a in diff],
            "passes": routed.passes, "drawing": args.dot, "heatmap": heat,
        })
        return 0
    info(f"model   {routed.base.describe()}")
    info(f"plan    {plan.variant}, units {'+'.join(plan.kinds) if plan.variant != 'mod' else 'whole layers'}, "
         f"layers {'all' if plan.layers is None else plan.layers}, router width "
         f"{plan.router_width(routed.arch.hidden)}, LFF rank {plan.lff_rank}, n_sink {plan.n_sink}, "
         f"kv {plan.kv_policy}")
    info(f"graph   {fmt_int(routed.capture_nodes)} captured nodes → {fmt_int(len(routed.gm.graph.nodes))} "
         f"top-level nodes with {len(routed.units)} routed units"
         + (f", {len(routed.folded)} folded (no router)" if routed.folded else ""))
    info("")
    e = 1 - args.sparsity
    achieved = routed.records.get("evaluation", {}).get("sparsity", {}).get("by_unit", {})
    evidence = any(r.held_in_execute is not None for r in rows)  # the fold's held-in execute fractions
    extra = f" {'achieved s':>10}" if achieved else ""
    extra += f" {'held-in e':>9}" if evidence else ""
    wide = 16 if routed.folded else 6
    info(f"{'layer':>5}  {'unit':<5} {'routed':<{wide}} {'router':>9} {'LFF':>9} "
         f"{'MFLOP/tok dense':>16} {f'routed @ e={e:.2f}':>16}{extra}  structure")
    for r in rows:
        got = achieved.get(r.name)
        cell = (f" {got:>10.2f}" if got is not None else f" {'–':>10}") if achieved else ""
        if evidence:
            cell += f" {r.held_in_execute:>9.3f}" if r.held_in_execute is not None else f" {'':>9}"
        status = f"folded: {r.folded}" if r.folded else "yes" if r.routed else "no"
        router = fmt_int(r.router_params) if not r.folded else ""
        info(f"{r.layer:>5}  {r.kind:<5} {status:<{wide}} {router:>9} "
             f"{fmt_int(r.lff_params):>9} {r.dense_flops / 1e6:>16.2f} {r.routed_flops / 1e6:>16.2f}{cell}"
             f"  {r.structure}")
    lead = 27 + wide
    info(f"{'LM head':<{lead}} {routed.arch.head_flops() / 1e6:>16.2f} {routed.arch.head_flops() / 1e6:>16.2f}")
    info(f"{'total (T=' + str(args.seq_len) + ')':<{lead}} {dense / 1e6:>16.2f} {after / 1e6:>16.2f}  "
         f"({dense / after:.2f}× fewer, {100 * (1 - after / dense):.1f}% saved at unit sparsity {args.sparsity})")
    recorded = _recorded(routed)
    if recorded:
        info(f"recorded: unit sparsity {recorded['unit_sparsity']:.3f}, FLOPs saved "
             f"{100 * recorded['flops_saved']:.1f}% on {recorded['data']} (irc convert's evaluation)")
    info("")
    info("graph diff: op counts before the pass → after it (top level plus the units' own bodies)")
    for op, b, a in diff:
        info(f"  {op:<34} {b:>6} → {a:<6}")
    if not args.no_code:
        for part, gm in unit_parts(unit).items():
            info("")
            info(f"# --- {name}.{part} ---")
            info(gm.code.strip())
    if drawn:
        info("")
        info(f"drawing: wrote {args.dot} ({drawn})")
    if heat:
        info(f"heatmap: wrote {args.heatmap} ({len(heat['units'])} units × {len(heat['tokens'])} tokens, "
             f"{heat['mode']} mode; execute fractions {heat['execute_fraction_source']})")
    info(f"PASSED inspect {time.perf_counter() - start:.1f}s units={len(routed.units)} "
         f"flops {dense / 1e6:.1f}→{after / 1e6:.1f} MFLOP/token ({dense / after:.2f}×) at sparsity {args.sparsity}")
    return 0


def _recorded(routed) -> dict | None:
    """Unit sparsity and FLOPs saved that ``irc convert`` measured, if this is a converted model."""
    ev = routed.records.get("evaluation", {})
    if "flops_per_token" not in ev:
        return None
    return {"unit_sparsity": ev["sparsity"]["overall"], "flops_saved": ev["flops_per_token"]["saved"],
            "data": ev.get("data")}


def _check_heatmap_args(args: argparse.Namespace) -> None:
    """``--prompt``/``--heatmap`` checks that need no model: they fail before anything loads."""
    from irc.errors import UserError
    from irc.inspect.heatmap import check_heatmap_path
    from irc.routing import is_routed_dir

    if not args.heatmap:
        raise UserError("--prompt is only used with --heatmap FILE.png|FILE.svg; add one or drop --prompt")
    if not args.prompt:
        raise UserError("--heatmap needs --prompt TEXT: the text whose routing decisions it draws")
    check_heatmap_path(args.heatmap)
    if not is_routed_dir(args.model):
        raise UserError(f"--heatmap needs a routed model directory (with irc.json), got {args.model!r}: the "
                        f"untrained routers of a base model execute every token; convert it first with "
                        f"irc convert {args.model} -o OUT")


def _heatmap(routed, args: argparse.Namespace) -> dict:
    from irc.inspect.heatmap import routing_heatmap

    return routing_heatmap(routed, args.prompt, args.heatmap, title=f"routing decisions of {args.model}",
                           show_progress=not args.json)
