"""Drawings of a routed unit: Graphviz DOT, rendered to SVG.

``unit_dot`` lays the unit out as clusters (norm, router, forecaster, key/value
path, query path) of its graph nodes. ``write_drawing`` renders SVG with
Graphviz's ``dot`` when it is on PATH, and otherwise with a small built-in
layered layout (same nodes and edges, clusters shown by colour), so that
``irc inspect --dot`` works on a machine without Graphviz too.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path

import torch
from torch.fx import GraphModule

from irc.inspect.summary import unit_parts

COLOURS = {
    "input": "#eeeeee", "norm": "#dbe9f6", "router": "#fde2c8", "forecaster": "#e4f2d9",
    "kv": "#e8def3", "query": "#f9d9dc", "body": "#f9d9dc", "block": "#f9d9dc", "routing": "#fff6bf",
}
TITLES = {
    "norm": "pre-norm (all tokens)", "router": "router (all tokens)",
    "forecaster": "forecaster (approximated tokens)", "kv": "keys and values (all tokens)",
    "query": "query path (executed tokens only)", "body": "unit (executed tokens only)",
    "block": "decoder layer (selected tokens only)",
}


def _short(target) -> str:
    name = getattr(target, "__name__", str(target))
    return name.replace(".default", "").replace(".Tensor", "")


def unit_graph(unit: torch.nn.Module) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """Nodes ``(id, label, cluster)`` and edges of a routed unit, its parts joined by routing steps."""
    nodes: list[tuple[str, str, str]] = [("x", "x (residual)", "input")]
    edges: list[tuple[str, str]] = []
    parts = unit_parts(unit)
    outputs: dict[str, str] = {}

    def add_part(part: str, gm: GraphModule, inputs: dict[int, str]) -> None:
        ids: dict = {}
        ph = 0
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                if ph in inputs:
                    ids[n] = inputs[ph]
                elif isinstance(n.meta.get("val"), torch.Tensor):  # rotary tables, masks
                    nid = f"in_{n.name}"
                    if all(nid != m for m, _, _ in nodes):
                        nodes.append((nid, n.name, "input"))
                    ids[n] = nid
                ph += 1
            elif n.op == "call_function":
                nid = f"{part}_{n.name}"
                nodes.append((nid, _short(n.target), part))
                ids[n] = nid
                for a in n.all_input_nodes:
                    if a in ids:
                        edges.append((ids[a], nid))
            elif n.op == "output":
                outs = n.args[0] if isinstance(n.args[0], tuple) else (n.args[0],)
                outputs[part] = ",".join(ids[o] for o in outs if o in ids)

    if "block" in parts:
        nodes.append(("router", "router: Linear → ReLU → Linear(1)", "router"))
        edges.append(("x", "router"))
        nodes.append(("select", "top-k tokens per row", "routing"))
        edges.append(("router", "select"))
        nodes.append(("gather", "token_gather", "routing"))
        edges += [("x", "gather"), ("select", "gather")]
        add_part("block", parts["block"], {0: "gather"})
        nodes.append(("scatter", "x + w·(layer − x) → token_scatter", "routing"))
        edges.append((outputs["block"], "scatter"))
        return nodes, edges
    add_part("norm", parts["norm"], {0: "x"})
    a = outputs["norm"]
    how = getattr(unit, "how", None)  # a folded unit (fold_static_routes): no router
    if how == "plain":
        add_part("body", parts["body"], {0: a})
        return nodes, edges
    if how == "forecast":
        nodes.append(("decide", f"folded: the first {unit.n_sink} real tokens execute, the rest forecast",
                      "routing"))
        edges.append((a, "decide"))
    else:
        nodes.append(("router", "router: Linear → ReLU → Linear(2)", "router"))
        nodes.append(("decide", "execute = margin ≥ θ (or top-k) | sinks, & real", "routing"))
        edges += [(a, "router"), ("router", "decide")]
    nodes.append(("gather", "token_gather (sinks)" if how else "token_gather (executed)", "routing"))
    edges += [(a, "gather"), ("decide", "gather")]
    if "kv" in parts:
        add_part("kv", parts["kv"], {0: "gather" if how else a})
        k_id, v_id = outputs["kv"].split(",")
        sources = {"hidden": "gather", "k": k_id, "v": v_id}
        q_inputs = {i: sources[r.source] for i, r in enumerate(unit.query_roles) if r.source in sources}
        add_part("query", parts["query"], q_inputs)
        unit_out = outputs["query"]
    else:
        add_part("body", parts["body"], {0: "gather"})
        unit_out = outputs["body"]
    nodes.append(("scatter", "token_scatter (executed + forecast)", "routing"))
    edges.append((unit_out, "scatter"))
    if unit.forecaster is not None:
        nodes.append(("lff", f"forecaster: Linear(D,{unit.forecaster.w1.out_features}) → SiLU → Linear", "forecaster"))
        edges += [(a, "lff"), ("decide", "lff"), ("lff", "scatter")]
    return nodes, edges


def unit_dot(unit: torch.nn.Module, title: str) -> str:
    nodes, edges = unit_graph(unit)
    lines = [f'digraph "{title}" {{', '  rankdir=TB; node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             f'  label="{title}"; labelloc=t; fontname="Helvetica";']
    clusters: dict[str, list] = {}
    for nid, label, cluster in nodes:
        clusters.setdefault(cluster, []).append((nid, label))
    for cluster, members in clusters.items():
        body = "\n".join(f'    "{nid}" [label="{label}", fillcolor="{COLOURS[cluster]}"];' for nid, label in members)
        if cluster in TITLES:
            lines.append(f'  subgraph "cluster_{cluster}" {{\n    label="{TITLES[cluster]}"; style=dashed;\n{body}\n  }}')
        else:
            lines.append(body)
    lines += [f'  "{a}" -> "{b}";' for a, b in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_drawing(unit: torch.nn.Module, path: str | Path, title: str) -> str:
    """Write ``path`` (``.svg`` or ``.dot``); returns which renderer drew it."""
    path = Path(path)
    dot = unit_dot(unit, title)
    if path.suffix == ".dot":
        path.write_text(dot)
        return "dot text"
    exe = shutil.which("dot")
    if exe:
        svg = subprocess.run([exe, "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
        path.write_text(svg)
        return "graphviz"
    path.write_text(_layered_svg(*unit_graph(unit), title))
    return "built-in layout"


def _layered_svg(nodes, edges, title: str) -> str:
    """A small layered (longest-path) layout, rendered as SVG."""
    ids = [n for n, _, _ in nodes]
    preds: dict[str, list[str]] = {n: [] for n in ids}
    for a, b in edges:
        if a in preds and b in preds:
            preds[b].append(a)
    level: dict[str, int] = {}

    def depth(n: str, seen=()) -> int:
        if n not in level:
            level[n] = 1 + max((depth(p, seen + (n,)) for p in preds[n] if p not in seen), default=-1)
        return level[n]

    for n in ids:
        depth(n)
    rows: dict[int, list] = {}
    for nid, label, cluster in nodes:
        rows.setdefault(level[nid], []).append((nid, label, cluster))
    box_w, box_h, gap_x, gap_y = 190, 26, 14, 22
    width = max(len(r) for r in rows.values()) * (box_w + gap_x) + gap_x
    height = (max(rows) + 1) * (box_h + gap_y) + 40
    pos = {}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="Helvetica" font-size="10">',
           f'<text x="{gap_x}" y="16" font-size="13">{html.escape(title)}</text>']
    for lvl, members in sorted(rows.items()):
        offset = (width - len(members) * (box_w + gap_x)) / 2
        for i, (nid, _label, _cluster) in enumerate(members):
            x, y = offset + gap_x / 2 + i * (box_w + gap_x), 30 + lvl * (box_h + gap_y)
            pos[nid] = (x, y)
    for a, b in edges:
        if a in pos and b in pos:
            (x1, y1), (x2, y2) = pos[a], pos[b]
            out.append(f'<line x1="{x1 + box_w / 2:.0f}" y1="{y1 + box_h:.0f}" x2="{x2 + box_w / 2:.0f}" '
                       f'y2="{y2:.0f}" stroke="#888" stroke-width="1"/>')
    for nid, label, cluster in nodes:
        x, y = pos[nid]
        out.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="5" '
                   f'fill="{COLOURS[cluster]}" stroke="#555"><title>{html.escape(TITLES.get(cluster, cluster))}</title></rect>')
        out.append(f'<text x="{x + box_w / 2:.0f}" y="{y + 17:.0f}" text-anchor="middle">{html.escape(label[:34])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
