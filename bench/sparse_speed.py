"""Routed vs dense prefill time of SmolLM2-135M with random routing masks.

Every one of the 60 units is routed (informed variant: routers and forecasters
run); each unit executes a random subset of exactly round(e·T) tokens (plus
the 4 sink tokens) at execute fractions e = 1.0, 0.75, 0.5, 0.25. Dense is the
same captured graph before the routing pass. Timings interleave dense and
routed runs and report the median of --repeats runs after --warmup runs.

    .venv/bin/python bench/sparse_speed.py            # writes docs/results/sparse_speed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irc.benchmark.results import results_path  # noqa: E402
from irc.capture import capture  # noqa: E402
from irc.eval.flops import model_flops  # noqa: E402
from irc.models import load_model  # noqa: E402
from irc.passes.drop_noop_conversions import drop_noop_conversions  # noqa: E402
from irc.passes.route_decoder_blocks import route_decoder_blocks, routed_modules, set_routing  # noqa: E402
from irc.plan import RoutingPlan  # noqa: E402


def random_masks(names, batch, seq, fraction, generator):
    masks = {}
    for name in names:
        mask = torch.zeros(batch, seq, dtype=torch.bool)
        k = round(fraction * seq)
        for b in range(batch):
            mask[b, torch.randperm(seq, generator=generator)[:k]] = True
        masks[name] = mask
    return masks


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--fractions", default="1.0,0.75,0.5,0.25")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "sparse_speed"))
    args = p.parse_args()

    wall_start = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_model(args.model, dtype=args.dtype)
    dense = capture(loaded.model).gm
    routed = capture(loaded.model).gm
    drop_noop_conversions(routed)
    plan = RoutingPlan()
    route_decoder_blocks(routed, plan)
    names = list(routed_modules(routed))
    B, T = args.batch, args.seq_len
    ids = torch.randint(0, loaded.arch.vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for fraction in [float(f) for f in args.fractions.split(",")]:
            set_routing(routed, "mask", masks=random_masks(names, B, T, fraction, gen), record=False)
            for _ in range(args.warmup):
                dense(ids, mask)
                routed(ids, mask)
            td, tr = [], []
            for _ in range(args.repeats):
                td.append(timed(lambda: dense(ids, mask)))
                tr.append(timed(lambda: routed(ids, mask)))
            d, r = statistics.median(td), statistics.median(tr)
            pair = sorted(a / b for a, b in zip(td, tr, strict=True))  # speedup of each interleaved pair
            fd, fr = model_flops(loaded.arch, plan, T, fraction)
            row = {"execute_fraction": fraction, "dense_ms": d * 1e3, "routed_ms": r * 1e3,
                   "speedup": d / r, "speedup_pair_min": pair[0], "speedup_pair_max": pair[-1],
                   "flop_bound_speedup": fd / fr,
                   "dense_gflops_per_token": fd / 1e9, "routed_gflops_per_token": fr / 1e9}
            rows.append(row)
            print(f"execute {fraction:.2f}: dense {d*1e3:7.1f} ms  routed {r*1e3:7.1f} ms  "
                  f"speedup {d/r:.2f}x [{pair[0]:.2f}-{pair[-1]:.2f}]  (FLOP bound {fd/fr:.2f}x)", flush=True)
    wall = time.perf_counter() - wall_start
    command = "python bench/sparse_speed.py " + " ".join(sys.argv[1:])
    result = {
        "command": command.strip(),
        "model": args.model, "dtype": args.dtype, "batch": B, "seq_len": T,
        "units_routed": len(names), "variant": plan.variant,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "wall_seconds": round(wall, 1),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results_path(out, ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Sparse execution speed: routed vs dense prefill",
        "",
        f"SmolLM2-135M ({args.dtype}), B={B}, T={T}, all {len(names)} units routed (informed: "
        "routers and forecasters run), random routing masks with exactly round(e·T) executed "
        f"tokens per unit (plus 4 sinks). Median of {args.repeats} interleaved runs after "
        f"{args.warmup} warm-up runs; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        "CPU.",
        "",
        f"Command: `{result['command']}` (wall time {wall:.0f} s)",
        "",
        "| execute fraction | dense ms | routed ms | speedup (medians) | speedup range over pairs | FLOP-bound speedup |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['execute_fraction']:.2f} | {r['dense_ms']:.1f} | {r['routed_ms']:.1f} | "
                     f"{r['speedup']:.2f}× | {r['speedup_pair_min']:.2f}–{r['speedup_pair_max']:.2f}× | "
                     f"{r['flop_bound_speedup']:.2f}× |")
    lines += [
        "",
        "Notes:",
        "- The FLOP-bound column is dense FLOPs / routed FLOPs per token from `irc.eval.flops` "
        "(routers on every token, forecasters on approximated tokens, keys and values on every "
        "token, queries and MLPs on executed tokens).",
        "- At 1.00 every token executes, and each unit takes its all-execute path (no gathers, no "
        "scatters): the remaining cost is the routers and the routing decision (≈0.3 ms per unit, "
        "≈2.5% of the prefill). Timing noise on this shared 2-core machine is of the same size: "
        "the range column gives the speedup of each interleaved dense/routed pair.",
        "- On this CPU the attention kernel (`scaled_dot_product_attention` with a boolean mask) is "
        "about half of the dense prefill at T=1024; the query-sparse path shrinks it in proportion "
        "to the executed queries.",
    ]
    results_path(out, ".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {results_path(out, '.md')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
