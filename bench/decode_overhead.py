"""Where routed decoding spends its time: one decode step at batch 1, four ways.

After a --prompt-len prefill, times --steps greedy decode steps of the routed
model's decode graph (torch, bf16) in four settings that isolate the routing
cost from the compute it saves:

- dense:      every unit runs, no router (the baseline);
- threshold:  the calibrated decisions (what ``irc generate`` runs);
- all-exec:   thresholds at −∞: routers and decisions run, every unit executes
              (pure routing overhead);
- none-exec:  thresholds at +∞: every unit is approximated (the most routing can
              save, forecasts included);
- unrouted:   the base model's decode graph before the routing pass (what `dense`
              costs without the routed units' module calls).

    .venv/bin/python bench/decode_overhead.py --model runs/bench-quality-standard/informed-0.25
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import irc  # noqa: E402
from irc.generation.decoder import decoder_for  # noqa: E402

SETTINGS = {"dense": ("dense", None), "threshold": ("threshold", None),
            "all-exec": ("threshold", -1e9), "none-exec": ("threshold", 1e9)}


def step_ms(routed, decoder, ids, mode, threshold, steps, graph=None) -> float:
    """Milliseconds per decode step; ``graph``: run this unrouted decode graph instead."""
    if graph is not None:
        def step(i, m, p):
            logits, *present = graph(i, m, *p)
            return logits, present
    else:
        step = decoder.step
    routed.set_routing(mode, record=False)
    saved = {name: unit.threshold.clone() for name, unit in routed.units.items()}
    if threshold is not None:
        for unit in routed.units.values():
            unit.threshold.fill_(threshold)
    decoder.sync()
    try:
        with torch.inference_mode():
            mask = torch.ones_like(ids)
            logits, past = step(ids, mask, decoder.empty_cache(1))
            token = logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
                logits, past = step(token, mask, past)
                token = logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - start) / steps * 1e3
    finally:
        for name, value in saved.items():
            routed.units[name].threshold.copy_(value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/smollm2-s25")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "decode_overhead"))
    args = p.parse_args()

    from irc.benchmark.speed import text_inputs
    from irc.generation.capture import capture_decode

    routed = irc.load(args.model)
    decoder = decoder_for(routed)
    unrouted = capture_decode(routed.base.model).gm
    ids, _ = text_inputs(routed.base.tokenizer, 1, args.prompt_len)
    times = {name: [] for name in (*SETTINGS, "unrouted")}
    for _ in range(args.repeats):  # settings interleaved, so noise hits all alike
        for name, (mode, threshold) in SETTINGS.items():
            times[name].append(step_ms(routed, decoder, ids, mode, threshold, args.steps))
        times["unrouted"].append(step_ms(routed, decoder, ids, "dense", None, args.steps, graph=unrouted))
    ms = {name: statistics.median(v) for name, v in times.items()}
    command = "python bench/decode_overhead.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command.strip(), "model": args.model, "prompt_len": args.prompt_len, "steps": args.steps,
         "repeats": args.repeats, "ms_per_step": ms, "all_runs": times, "torch": torch.__version__,
         "threads": torch.get_num_threads()}, indent=2) + "\n")
    lines = ["# Routed decoding at batch 1: routing overhead vs what it saves", "",
             f"Model `{args.model}` (torch {torch.__version__}, bf16, {torch.get_num_threads()} threads); "
             f"{args.steps} greedy decode steps after a {args.prompt_len}-token prompt; median of "
             f"{args.repeats} interleaved repeats.", "", f"Command: `{command.strip()}`", "",
             "| setting | ms per step | vs dense |", "|---|---:|---:|"]
    for name, value in ms.items():
        lines.append(f"| {name} | {value:.2f} | {ms['dense'] / value:.2f}× |")
    lines += ["", f"Routing overhead (all-exec − dense): {ms['all-exec'] - ms['dense']:.2f} ms per step; "
              f"the most routing can save (dense − none-exec): {ms['dense'] - ms['none-exec']:.2f} ms."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
