"""What an ONNX ``If`` costs in the routed decode step: the step file against itself with its branches inlined.

Takes the routed model's one-token step files (``OnnxDecodeConfig.step_file``, dense and
threshold; exported once, cached) and writes two probes of the threshold file, each a graph
edit of the same file: every routed unit's ``If`` replaced by its execute branch inlined
(``inlined execute``: the routers and decisions still run, as the file's ``decisions``
output needs them) or by its forecaster branch inlined (``inlined forecast``). Then times
one decode step of each, and of the general files (``decode.onnx``, nested ``If`` nodes and
traced sizes) for the same step, on the cache of a real --prompt-len-token prompt (prefilled
once by the general file), interleaved: --rounds rounds of --blocks blocks of 5 steps per
setting. The 10th percentile of the block means is the figure (this machine's noise is
one-sided: other work only slows a block); ratios are dense / setting.

    all-exec (If)      vs  inlined execute   : what the If nodes cost when every unit executes
    none-exec (If)     vs  inlined forecast  : ... when every unit is approximated
    X                  vs  X (general file)  : what the step file buys

    .venv/bin/python bench/ort_branch_cost.py --model runs/frontier/informed-folded@0.20

The probes are for measurement only (``irc`` never writes them into an export).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import irc  # noqa: E402
from irc.benchmark.results import results_path  # noqa: E402
from irc.exporters.onnx_decode import STEP_FILE, OnnxDecodeConfig, load_or_export_decode  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from decode_overhead import threshold_options  # noqa: E402


def routed_ifs(graph: onnx.GraphProto) -> list[int]:
    """Positions of the routed units' If nodes: their else branch is the forecaster (a folded unit's
    passes the cache through)."""
    found = []
    for i, node in enumerate(graph.node):
        if node.op_type == "If":
            other = next(a.g for a in node.attribute if a.name == "else_branch")
            if any(n.op_type in ("MatMul", "Gemm") for n in other.node):
                found.append(i)
    return found


def inlined(step_file: Path, branch: str, out: Path) -> int:
    """Write ``step_file`` with every routed unit's If replaced by its ``branch`` inlined; the count."""
    model = onnx.load(str(step_file), load_external_data=False)
    graph = model.graph
    targets = set(routed_ifs(graph))
    nodes = []
    for i, node in enumerate(graph.node):
        if i not in targets:
            nodes.append(node)
            continue
        sub = next(a.g for a in node.attribute if a.name == branch)
        for inner in sub.node:
            inner.name = f"inlined{i}/{inner.name}"  # branch node names repeat across units
            nodes.append(inner)
        graph.initializer.extend(sub.initializer)
        nodes += [helper.make_node("Identity", [o.name], [name], name=f"inlined{i}/out{j}")
                  for j, (o, name) in enumerate(zip(sub.output, node.output, strict=True))]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(out))
    return len(targets)


def session(path: Path, theta: float | None = None):
    options, keep = threshold_options(path, theta) if theta is not None else (None, [])
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    s.overrides = keep  # the session reads them: they must outlive it
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/frontier/informed-folded@0.20")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "ort_branch_cost"))
    args = p.parse_args()

    from irc.benchmark.speed import text_inputs

    routed = irc.load(args.model, dtype="fp32")
    files, general = {}, {}
    for routing in ("dense", "threshold"):
        routed.set_routing(routing)
        decoder = load_or_export_decode(routed, None, OnnxDecodeConfig(routing=routing, step_file=True),
                                        log=lambda line: print(line, file=sys.stderr))
        files[routing], general[routing] = decoder.path.with_name(STEP_FILE), decoder.path
    # the real cache of a prompt, prefilled by the threshold file's general session
    ids, _ = text_inputs(routed.base.tokenizer, 1, args.prompt_len)
    logits, past = decoder.step(ids, torch.ones_like(ids), decoder.empty_cache(1))
    feeds = {"input_ids": logits[:, -1].argmax(-1, keepdim=True).numpy().astype(np.int64),
             "attention_mask": np.ones((1, ids.shape[1] + 1), np.int64),
             **dict(zip(decoder.cache_names, past, strict=True))}
    # the probes sit beside the step file (ORT resolves external data in the model's own directory), removed after
    probes = {name: files["threshold"].with_name(f".probe-{os.getpid()}-{branch}.onnx")
              for name, branch in (("inlined execute", "then_branch"), ("inlined forecast", "else_branch"))}
    try:
        for path in probes.values():
            n_ifs = inlined(files["threshold"], path.stem.rsplit("-", 1)[1], path)
        settings = {"dense": session(files["dense"]), "threshold (If)": session(files["threshold"]),
                    "all-exec (If)": session(files["threshold"], -1e9),
                    "inlined execute": session(probes["inlined execute"]),
                    "none-exec (If)": session(files["threshold"], 1e9),
                    "inlined forecast": session(probes["inlined forecast"]),
                    # the general file run for the same one-token step: what the step file buys
                    "dense (general file)": session(general["dense"]),
                    "threshold (general file)": session(general["threshold"]),
                    "all-exec (general file)": session(general["threshold"], -1e9),
                    "none-exec (general file)": session(general["threshold"], 1e9)}
    finally:
        for path in probes.values():
            path.unlink(missing_ok=True)
    blocks = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, s in settings.items():
            s.run(None, feeds)
            for _ in range(args.blocks):
                start = time.perf_counter()
                for _ in range(5):
                    s.run(None, feeds)
                blocks[name].append((time.perf_counter() - start) / 5 * 1e3)
    p10 = {name: sorted(v)[len(v) // 10] for name, v in blocks.items()}
    median = {name: statistics.median(v) for name, v in blocks.items()}
    command = "python bench/ort_branch_cost.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results_path(out, ".json").write_text(json.dumps(
        {"command": command.strip(), "model": args.model, "prompt_len": args.prompt_len, "routed_ifs": n_ifs,
         "rounds": args.rounds, "blocks": args.blocks, "p10_ms": p10, "median_ms": median,
         "onnxruntime": ort.__version__, "blocks_ms": blocks}, indent=2) + "\n")
    lines = [f"# What an ONNX If costs in the routed decode step ({args.model})", "",
             f"One-token step files (batch 1, ONNX Runtime {ort.__version__}, CPU), one step after a "
             f"{args.prompt_len}-token prompt; {n_ifs} routed units' If nodes. Per setting "
             f"{args.rounds * args.blocks} blocks of 5 steps, interleaved; the 10th percentile and the "
             "median of the block means. `inlined execute` / `inlined forecast`: the threshold file with every "
             "routed unit's If replaced by that branch inlined (a probe, never exported).", "",
             f"Command: `{command.strip()}`", "",
             "| setting | p10 ms per step | dense / setting (p10) | median ms |", "|---|---:|---:|---:|"]
    for name in settings:
        lines.append(f"| {name} | {p10[name]:.2f} | {p10['dense'] / p10[name]:.3f}× | {median[name]:.2f} |")
    lines += ["", f"The If nodes, every unit executing: {p10['all-exec (If)'] - p10['inlined execute']:.2f} ms "
              f"per step ({(p10['all-exec (If)'] - p10['inlined execute']) / n_ifs * 1e3:.0f} µs per If); every "
              f"unit approximated: {p10['none-exec (If)'] - p10['inlined forecast']:.2f} ms "
              f"({(p10['none-exec (If)'] - p10['inlined forecast']) / n_ifs * 1e3:.0f} µs per If). "
              "The step file against the general file (p10, general / step): "
              + ", ".join(f"{name} {p10[f'{name} (general file)'] / p10[key]:.3f}×" for name, key in
                          (("dense", "dense"), ("threshold", "threshold (If)"), ("all-exec", "all-exec (If)"),
                           ("none-exec", "none-exec (If)"))) + "."]
    results_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
