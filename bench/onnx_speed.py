"""Dense vs routed prefill of a routed SmolLM2 in ONNX Runtime (and PyTorch), on this CPU.

Runs ``irc.benchmark.speed.bench_speed`` (what ``irc bench`` runs) for each backend and
routing given, on real held-out text, and writes one table per run into
docs/results/onnx_speed.{json,md}, with the command that produced it.

    .venv/bin/python bench/onnx_speed.py --model runs/bench-quality-standard/informed-0.25
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irc.benchmark.results import results_path  # noqa: E402
from irc.benchmark.speed import SpeedConfig, bench_speed, markdown_table  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/smollm2-s25", help="routed model directory (irc convert)")
    p.add_argument("--runs", default="ort:threshold,ort:capacity,torch:threshold",
                   help="comma-separated backend:routing pairs")
    p.add_argument("--seq-lens", default="128,512,1024,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "onnx_speed"))
    args = p.parse_args()

    command = "python bench/onnx_speed.py " + " ".join(sys.argv[1:])
    seq_lens = tuple(int(s) for s in args.seq_lens.split(","))
    out = Path(args.out)
    results = []
    wall = time.perf_counter()
    for run in args.runs.split(","):
        backend, routing = run.split(":")
        config = SpeedConfig(seq_lens=seq_lens, batch=args.batch, routing=routing, repeats=args.repeats)
        print(f"== {backend} {routing}", flush=True)
        result = bench_speed(args.model, backend, config, log=lambda s: print(s, flush=True))
        results.append(result)
        _write(out, command, args, results, time.perf_counter() - wall)  # after every run: nothing lost
    print(f"wrote {results_path(out, '.md')} and .json")
    return 0


def _write(out: Path, command: str, args, results, wall: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": command.strip(), "wall_seconds": round(wall, 1), "runs": [r.to_dict() for r in results]}
    results_path(out, ".json").write_text(json.dumps(data, indent=2) + "\n")
    first = results[0].meta
    lines = [
        "# Routed vs dense prefill in ONNX Runtime (and PyTorch), CPU",
        "",
        f"Routed model `{args.model}` (trained for sparsity {first.get('trained_sparsity')}); inputs are "
        "windows of the held-out wiki text. Dense and routed run the same inputs; the medians are over "
        f"{args.repeats} grouped plus {args.repeats} interleaved runs per side, the pair range over the "
        "interleaved ones. Peak extra MB: the sampled RSS peak of one forward in a fresh process per "
        "side and length, above that process's RSS after loading. Machine: {first.get('machine')}, {first.get('threads')} threads.",
        "",
        f"Command: `{data['command']}` (wall time {wall:.0f} s)",
    ]
    for r in results:
        c = r.config
        what = "calibrated thresholds" if c.routing == "threshold" else f"capacity c = {c.capacity:.2f} per row"
        version = f"onnxruntime {r.meta['onnxruntime']}, fp32" if r.backend == "ort" else \
            f"torch {r.meta['torch']}, {r.meta['dtype']}"
        lines += ["", f"## {r.backend}, {c.routing} routing ({what}; {version})", "", *markdown_table(r)]
    results_path(out, ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
