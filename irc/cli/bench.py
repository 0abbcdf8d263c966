"""``irc bench OUT --backend torch|ort``: dense vs routed prefill, side by side."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="dense vs routed prefill speed and memory (torch or ONNX Runtime)",
        description="Time the dense model and the routed model OUT on the same held-out text at each "
        "sequence length, interleaved, and report tokens/s, the speedup, peak memory and the execute "
        "fraction. --backend ort exports dense and routed ONNX files into OUT/onnx on first use.",
    )
    p.add_argument("model", help="routed model directory (from irc convert)")
    p.add_argument("--backend", default="torch", choices=["torch", "ort", "trt"],
                   help="torch (PyTorch eager), ort (ONNX Runtime, CPU) or trt (TensorRT engines built from "
                   "trt-profile exports; needs the trt extra and an NVIDIA GPU)")
    p.add_argument("--seq-lens", default="128,512,1024,2048", help="comma-separated lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--routing", default="threshold", choices=["threshold", "capacity"],
                   help="threshold: the calibrated per-token decisions (default); capacity: ceil(c·T) per row")
    p.add_argument("--capacity", type=float, help="capacity routing's execute fraction (default 1 − sparsity)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="torch precision (ort: fp32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side (twice: grouped, interleaved)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--data", default="wiki:heldout", help="text the inputs are cut from (default wiki:heldout)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory measurement (a fresh process per side and length)")
    p.add_argument("--onnx-dir", help="where the ONNX files live (default OUT/onnx)")
    p.add_argument("--out", help="write OUT_STEM.json and OUT_STEM.md")
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from irc.benchmark.speed import SpeedConfig, bench_speed, markdown_table
    from irc.cli.common import emit_json, info
    from irc.errors import UserError

    try:
        seq_lens = tuple(int(s) for s in args.seq_lens.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seq-lens must be comma-separated integers, got {args.seq_lens!r}") from None
    config = SpeedConfig(seq_lens=seq_lens, batch=args.batch, routing=args.routing, capacity=args.capacity,
                         dtype=args.dtype, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                         data=args.data, memory=not args.no_memory)
    if args.out:
        from irc.cache import check_output

        check_output(args.out, flag="--out")
    start = time.perf_counter()
    log = (lambda line: print(line, file=sys.stderr)) if args.json else info
    result = bench_speed(args.model, args.backend, config, onnx_dir=args.onnx_dir, log=log)
    data = result.to_dict()
    data["command"] = "irc bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        out.with_suffix(".md").write_text("\n".join(
            [f"# irc bench {args.model} --backend {args.backend}", "", f"Command: `{data['command']}`", "",
             *markdown_table(result)]) + "\n")
    if args.json:
        emit_json(data)
        return 0
    info("")
    for line in markdown_table(result):
        info(line)
    best = max(result.rows, key=lambda r: r["seq_len"])
    info(f"PASSED bench {time.perf_counter() - start:.1f}s backend={args.backend} routing={args.routing} "
         f"speedup@T={best['seq_len']} {best['speedup']:.2f}x")
    return 0
