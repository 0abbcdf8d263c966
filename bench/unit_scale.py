"""When does skipping a unit pay in a batch-1 decode step? Routing cost against unit size.

A routed unit that skips a token saves the unit's work and pays its router, its
forecaster and the Python around them; one that executes pays the router on top. Both
costs are fixed per unit and step, the work grows with the unit's weights, so per-token
routing pays from some unit size on. This measures where, on this machine, with the
decoder ``irc generate`` runs (torch, bf16, batch 1, the static cache, the step kernels
of ``irc.generation.row_kernels``).

Per shape (Llama models at the shapes of SmolLM2-135M, -360M and -1.7B: their widths,
depths and vocabularies, or --layers / --vocab; random weights and random routers,
``RoutingPlan`` defaults: the router width and the forecaster's rank r as a conversion
would choose them), three decode settings of the routed graph and the dense baseline,
interleaved, --steps steps after a --prompt-len prompt:

- dense:      the base model's decode step (``dense_decoder``);
- all-exec:   every unit executes (thresholds at −∞): the unit plus its routing;
- none-exec:  every unit is approximated (thresholds at +∞): its routing and forecast only.

From these, per unit and step: ``saved`` = (dense − none-exec) / units, what a skipped
token saves; ``overhead`` = (all-exec − dense) / units, what routing costs an executed
one. At execute fraction e the step takes about all-exec − (1 − e)(all-exec − none-exec),
so routing breaks even at e* = 1 − (all-exec − dense) / (all-exec − none-exec) and is
faster than dense below it.

    .venv/bin/python bench/unit_scale.py    # docs/results/unit_scale.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from decode_overhead import step_ms  # noqa: E402

import irc  # noqa: E402
from irc.benchmark.results import results_path  # noqa: E402
from irc.generation.decoder import decoder_for, dense_decoder  # noqa: E402
from irc.models import Architecture, LoadedModel  # noqa: E402
from irc.models.sources import ModelSource  # noqa: E402
from irc.plan import RoutingPlan  # noqa: E402

# name: (hidden, intermediate, heads, kv heads, layers, vocabulary), head_dim 64 throughout (the SmolLM2 family)
SHAPES = {"SmolLM2-135M": (576, 1536, 9, 3, 30, 49152), "SmolLM2-360M": (960, 2560, 15, 5, 32, 49152),
          "SmolLM2-1.7B": (2048, 8192, 32, 32, 24, 49152)}


def random_model(shape, seed: int = 0) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, heads, kv_heads, layers, vocab = shape
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return LoadedModel(model=model, tokenizer=None, arch=Architecture.from_config(config),
                       source=ModelSource(f"random-llama-{hidden}", "hf", None), directory=None,
                       dtype=torch.bfloat16, load_seconds=0.0, _weights_sha256="0" * 64)


def randomize_routing(routed, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in routed.units.values():
            for module in (unit.router, unit.forecaster):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def measure(name, shape, args) -> dict:
    start = time.perf_counter()
    shape = (*shape[:4], args.layers or shape[4], args.vocab or shape[5])
    routed = irc.route(random_model(shape), RoutingPlan())
    randomize_routing(routed)
    decoder, dense = decoder_for(routed), dense_decoder(routed)
    ids = torch.randint(3, shape[5], (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    settings = {"dense": (dense, "dense", None), "all-exec": (decoder, "threshold", -1e9),
                "none-exec": (decoder, "threshold", 1e9)}
    times = {s: [] for s in settings}
    for _ in range(args.repeats + 1):  # the first is a warm-up; settings interleaved
        for s, (graph, mode, theta) in settings.items():
            times[s].append(step_ms(routed, graph, ids, mode, theta, args.steps))
    ms = {s: statistics.median(v[1:]) for s, v in times.items()}
    units = len(routed.units)
    unit = next(iter(routed.units.values()))
    saved, overhead = (ms["dense"] - ms["none-exec"]) / units, (ms["all-exec"] - ms["dense"]) / units
    span = ms["all-exec"] - ms["none-exec"]
    row = {"shape": name, "hidden": shape[0], "intermediate": shape[1], "heads": shape[2], "kv_heads": shape[3],
           "layers": shape[4], "vocab": shape[5], "units": units, "router_hidden": unit.router.fc1.weight.shape[0],
           "lff_rank": unit.forecaster.w1.weight.shape[0], "aten_rows": decoder.aten_rows(),
           "ms": ms, "runs": {s: v[1:] for s, v in times.items()},
           "saved_per_unit_us": 1e3 * saved, "overhead_per_unit_us": 1e3 * overhead,
           "break_even_execute": 1 - (ms["all-exec"] - ms["dense"]) / span if span > 0 else None,
           "speedup_at_half": ms["dense"] / (ms["all-exec"] - 0.5 * span), "seconds": time.perf_counter() - start}
    print(f"{name}: dense {ms['dense']:.2f} ms, all-exec {ms['all-exec']:.2f}, none-exec {ms['none-exec']:.2f}; "
          f"per unit saved {row['saved_per_unit_us']:.0f} µs, overhead {row['overhead_per_unit_us']:.0f} µs, "
          f"break-even e* {row['break_even_execute']}", file=sys.stderr)
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# Routing cost against unit size: batch-1 decode steps, torch bf16", "",
             "Random-weight Llama models at each shape (layers and vocabulary as in the table), "
             f"`RoutingPlan()` defaults; {meta['steps']} decode steps after a {meta['prompt_len']}-token prompt, "
             f"median of {meta['repeats']} interleaved runs after a warm-up. torch {meta['torch']}, {meta['cpus']} "
             f"threads, {meta['date']}. Command: `{meta['command']}` (generated by `bench/unit_scale.py`; see its doc).",
             "",
             "| shape | D / intermediate | layers / vocabulary | router width / forecaster rank | step GEMM | dense ms "
             "| all-exec ms | none-exec ms | saved per skipped unit | routing per executed unit "
             "| break-even execute fraction | speed-up at e = 0.5 |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = r["break_even_execute"]
        e = "never" if e is None or e <= 0 else "any (≥ 1: no measurable overhead)" if e >= 1 else f"{e:.2f}"
        gemm = f"ATen ≤ {r['aten_rows']} rows" if r["aten_rows"] else "oneDNN"
        lines.append(f"| {r['shape']} | {r['hidden']} / {r['intermediate']} | {r['layers']} / {r['vocab']:,} "
                     f"| {r['router_hidden']} / {r['lff_rank']} "
                     f"| {gemm} | {r['ms']['dense']:.2f} | {r['ms']['all-exec']:.2f} | {r['ms']['none-exec']:.2f} "
                     f"| {r['saved_per_unit_us']:.0f} µs | {r['overhead_per_unit_us']:.0f} µs | {e} "
                     f"| {r['speedup_at_half']:.2f}× |")
    lines += ["", "saved: (dense − none-exec) / units; routing: (all-exec − dense) / units (negative: below this "
              "machine's run-to-run noise); break-even: the execute fraction below which the routed step beats "
              "dense, 1 − (all-exec − dense) / (all-exec − none-exec); speed-up at e = 0.5: dense / (all-exec − "
              "0.5 (all-exec − none-exec)), the straight line between the two measured ends (at batch 1 a unit's "
              "cost is linear in its executed tokens)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: each shape's own)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: each shape's own)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "unit_scale"))
    p.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json (no measuring)")
    args = p.parse_args()
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        p.error(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
    command = (".venv/bin/python bench/unit_scale.py " + shlex.join(sys.argv[1:])).strip()
    out = args.out
    if args.render:  # the markdown again from the JSON a run wrote (its own command inside)
        data = json.loads(results_path(out, ".json").read_text())
        results_path(out, ".md").write_text(markdown(data["meta"], data["rows"]))
        print(f"wrote {results_path(out, '.md')} from its .json", file=sys.stderr)
        return 0
    rows = [measure(s, SHAPES[s], args) for s in shapes]
    meta = {"machine": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": command, "steps": args.steps,
            "prompt_len": args.prompt_len, "repeats": args.repeats}
    results_path(out, ".json").parent.mkdir(parents=True, exist_ok=True)
    results_path(out, ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    results_path(out, ".md").write_text(markdown(meta, rows))
    print(f"wrote {results_path(out, '.md')} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
