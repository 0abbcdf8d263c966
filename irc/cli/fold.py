"""``irc fold OUT --epsilon ε -o FOLDED``: units with (almost) constant routes lose their routers."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fold",
        help="specialise a routed model: near-constant units become forecaster-only or plain units",
        description="Measure each routed unit's execute fraction on held-in data (threshold routing); "
        "units executing at most EPS of the non-sink tokens become forecaster-only units (attention: "
        "keys, values and queries for the sink tokens only), units executing at least 1 − EPS become "
        "plain units; neither keeps a router. The remaining routers are recalibrated to the budget the "
        "model was converted for, and the folded model is written to -o.",
    )
    p.add_argument("model", help="routed model directory (from irc convert)")
    p.add_argument("-o", "--out", required=True, help="output directory (the folded model)")
    p.add_argument("--epsilon", type=float, default=0.05, help="fold threshold ε in [0, 0.5) (default 0.05)")
    p.add_argument("--min-saving", type=float, default=0.0, metavar="S",
                   help="also fold plain every unit whose route saves less than S of the dense model's FLOPs "
                   "per token at its held-in execute fraction (e.g. 0.002: routes that cost a decode step "
                   "more in router and branch than they skip; default 0: off)")
    p.add_argument("--refine-steps", type=int, default=0, metavar="N",
                   help="after folding, train the model's LoRA deltas (the folded units' too) for N steps under "
                   "the folded model's own decisions, then recalibrate: wins back part of the quality a fold "
                   "gives up (needs a model converted with LoRA; default 0: off)")
    p.add_argument("--refine-lr", type=float, default=1e-3, help="refining's learning rate (default 1e-3)")
    p.add_argument("--refine-batch", type=int, default=4, metavar="B",
                   help="windows of --refine-seq-len per refining step (default 4)")
    p.add_argument("--refine-seq-len", type=int, default=512, help="refining window length (default 512)")
    p.add_argument("--refine-distill", type=float, default=0.0, metavar="W",
                   help="refining's loss: (1 − W)·cross-entropy + W·KL(dense base model ‖ folded model) "
                   "(default 0: cross-entropy only; the base model runs once more per step)")
    p.add_argument("--calib-data", default="wiki:train",
                   help="held-in corpus (default wiki:train; its last 4 windows of --seq-len); refining "
                   "trains on the windows before those")
    p.add_argument("--seq-len", type=int, default=1024, help="held-in window length (default 1024)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--overwrite", action="store_true", help="replace -o if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from irc.cli.common import emit_json, info
    from irc.errors import UserError
    from irc.routing import is_routed_dir

    if not 0.0 <= args.epsilon < 0.5:
        raise UserError(f"--epsilon must be in [0, 0.5), got {args.epsilon}")
    if not 0.0 <= args.min_saving < 1.0:
        raise UserError(f"--min-saving must be in [0, 1) (a share of the FLOPs per token), got {args.min_saving}")
    if args.refine_steps < 0 or args.refine_batch < 1 or args.refine_seq_len < 2 or not args.refine_lr > 0:
        raise UserError("--refine-steps must be >= 0, --refine-batch >= 1, --refine-seq-len >= 2 and "
                        "--refine-lr > 0")
    if not 0.0 <= args.refine_distill <= 1.0:
        raise UserError(f"--refine-distill must be in [0, 1], got {args.refine_distill}")
    if args.refine_distill > 0 and args.refine_steps == 0:
        raise UserError("--refine-distill weights the refining loss: it needs --refine-steps N > 0")
    if not is_routed_dir(args.model):
        raise UserError(f"{args.model} is not a routed model directory (no irc.json); irc fold works on the "
                        "output of irc convert")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; choose another directory or pass --overwrite")
    from irc.cache import check_output

    check_output(out)
    import irc
    from irc.data import load_corpus, token_stream
    from irc.data.windows import make_windows
    from irc.eval.routed import routed_budget
    from irc.train.fold import fold_routed

    start = time.perf_counter()
    routed = irc.load(args.model, dtype=args.dtype)
    if routed.plan.variant not in ("informed", "skip"):
        raise UserError(f"irc fold folds per-token routes; a {routed.plan.variant} model has none")
    if args.refine_steps > 0 and routed.plan.lora_rank <= 0:
        raise UserError(f"{args.model} has no LoRA deltas for --refine-steps to train (it was converted without "
                        "LoRA: the quick preset or --lora-steps 0); convert with --preset standard or --lora-steps N")
    training = routed.records.get("training", {})
    sparsity, flops_saved = training.get("sparsity"), training.get("flops_saved")
    held_in = token_stream(load_corpus(args.calib_data, default_split="train"), routed.tokenizer)
    n = 4 * args.seq_len
    if len(held_in) < n:
        raise UserError(f"{args.calib_data} has too few tokens to measure routes ({len(held_in)} < {n})")
    calib = make_windows(held_in[len(held_in) - n:], args.seq_len, 4)
    train = None
    if args.refine_steps > 0:  # the windows before the held-in ones, from the start of the corpus
        from irc.train.fold import refine_windows

        train = refine_windows(held_in, n, args.refine_steps, args.refine_batch, args.refine_seq_len,
                               name=args.calib_data)
    budget = None
    if sparsity is not None or flops_saved is not None:
        budget = lambda r: routed_budget(r, sparsity=None if flops_saved is not None else sparsity,  # noqa: E731
                                         flops_saved=flops_saved, seq_len=args.seq_len)
    record = fold_routed(routed, calib, args.epsilon, min_saving=args.min_saving, budget=budget,
                         show_progress=not args.json)
    if train is not None:
        from irc.train.fold import refine_folded
        from irc.train.lora_train import LoRATrainConfig

        teacher = None
        if args.refine_distill > 0:  # the dense base model (LoRA lives on the routed graph's units only)
            def teacher(ids):
                return routed.base.model(ids).logits

        record["refine"] = refine_folded(
            routed, train, LoRATrainConfig(steps=args.refine_steps, batch_size=args.refine_batch,
                                           lr=args.refine_lr, routing="threshold", distill=args.refine_distill),
            calib=calib, budget=budget, teacher=teacher, show_progress=not args.json)
        record["refine"]["distill"] = args.refine_distill
    routed.records = {**routed.records, "fold": record}
    routed.save(out, overwrite=args.overwrite)
    how = {h: sum(1 for v in record["folded"].values() if v == h) for h in ("forecast", "plain")}
    if args.json:
        emit_json({"model": args.model, "out": str(out), **record})
        return 0
    info(f"held-in     {args.calib_data}: 4 windows of {args.seq_len}; {record['near_static']} of "
         f"{record['routers_before']} units near-static (≤ 5% or ≥ 95% executed)")
    info(f"folded      {len(record['folded'])} units at ε {args.epsilon}: {how['forecast']} forecaster-only, "
         f"{how['plain']} plain; {record['routers_after']} keep routers")
    if args.min_saving > 0:
        info(f"min saving  {len(record['folded_for_saving'])} of them plain for saving under "
             f"{100 * args.min_saving:.2f}% of the FLOPs per token ({100 * record['saving_given_up']:.2f}% given up "
             "before recalibration)")
    if "recalibration" in record:
        rc = record["recalibration"]
        info(f"recalibrated {rc['budget']} budget: FLOPs saved {100 * rc['achieved_flops_saved']:.1f}% on held-in "
             f"data, unit sparsity {rc['achieved_sparsity']:.3f}")
    if "refine" in record:
        rf = record["refine"]
        kd = f", distilled from the base model at {rf['distill']}" if rf.get("distill") else ""
        info(f"refined     {rf['lora']['steps']} LoRA steps under the folded model's decisions{kd} (loss "
             f"{rf['lora']['first_loss']:.3f} → {rf['lora']['last_loss']:.3f})"
             + (f"; recalibrated: FLOPs saved {100 * rf['recalibration']['achieved_flops_saved']:.1f}% on held-in data"
                if rf.get("recalibration", {}).get("achieved_flops_saved") is not None else ""))
    info(f"PASSED fold {time.perf_counter() - start:.1f}s folded={len(record['folded'])} "
         f"routers={record['routers_after']} out={out}")
    return 0
