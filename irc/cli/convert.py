"""``irc convert MODEL -o OUT --sparsity S``: the whole job, resumable."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="turn a dense model into a trained routed model",
        description="Capture MODEL, rewrite its units into routed units, fit the forecasters, "
        "train the routers, calibrate the thresholds for --sparsity, evaluate dense vs routed "
        "perplexity, and save OUT. Every stage checkpoints beside OUT; --resume continues an "
        "interrupted run. OUT is written only when everything succeeded.",
    )
    p.add_argument("model", help="Hugging Face directory, .gguf file, or smollm2-135m")
    p.add_argument("-o", "--out", required=True, help="output directory (the routed model)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--flops-saved", type=float, metavar="F",
                        help="compute budget: the share of FLOPs per token saved, in [0, 1) (routers and "
                        "forecasters counted); router training weights each unit by its cost (the default "
                        "budget: 0.20)")
    budget.add_argument("--sparsity", type=float, metavar="S",
                        help="the paper's budget: the share of (token, unit) pairs approximated, in [0, 1)")
    p.add_argument("--variant", default="informed", choices=["informed", "skip", "mod", "static", "static-lff"],
                   help="informed (the paper), skip (SkipGPT), mod (Mixture-of-Depths), static (ShortGPT), "
                   "static-lff (whole units replaced by their forecasters, chosen greedily; needs --flops-saved)")
    p.add_argument("--fold-epsilon", type=float, default=0.05, metavar="EPS",
                   help="after calibration, fold units that execute ≤ EPS (forecaster only) or ≥ 1 − EPS "
                   "(plain unit) of held-in non-sink tokens: they lose their routers (default 0.05)")
    p.add_argument("--fold-min-saving", type=float, default=0.0, metavar="S",
                   help="when folding, also fold plain every unit whose route saves less than S of the dense "
                   "FLOPs per token (irc fold --min-saving; e.g. 0.002 for decoding; default 0: off)")
    p.add_argument("--refine-steps", type=int, default=0, metavar="N",
                   help="after folding, train the LoRA deltas of the folded model for N steps under its own "
                   "decisions (folded units' too), then recalibrate (irc fold --refine-steps; needs LoRA: the "
                   "standard preset or --lora-steps; default 0: off)")
    p.add_argument("--no-fold", action="store_true", help="keep every unit's router (no folding)")
    p.add_argument("--preset", default="quick", choices=["quick", "standard"],
                   help="training budget: quick (minutes, the demo) or standard (the benchmark)")
    p.add_argument("--data", default="wiki:train", help="training corpus (default wiki:train)")
    p.add_argument("--eval-data", default="wiki:heldout", help="evaluation corpus (default wiki:heldout)")
    p.add_argument("--eval-tokens", type=int, default=20480, help="tokens evaluated (default 20480)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--lff-rank", type=int, default=100, help="forecaster rank r (default 100)")
    p.add_argument("--lff-form", default="identity", choices=["identity", "silu"],
                   help="linear reduced-rank forecaster (closed form) or the paper's SiLU form")
    p.add_argument("--lff-fit", default="closed-form", choices=["closed-form", "smoothl1"],
                   help="forecaster fit: closed-form ridge + reduced rank (default) or the paper's SmoothL1")
    p.add_argument("--kv-policy", default="keep", choices=["keep", "drop"])
    p.add_argument("--no-router-init", action="store_true", help="skip stage 2 (router init from LFF error)")
    p.add_argument("--router-steps", type=int, help="override the preset's router training steps")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="windows per step of router training and LoRA, over all processes (default: the "
                   "preset's, quick 2, standard 4); with --nproc N it must be at least N")
    p.add_argument("--lora-steps", type=int,
                   help="after router training, train LoRA (rank 16, α 32, q/v/gate) for N steps, routers frozen "
                   "(default: the preset's, quick 0, standard 50; 0 skips it)")
    p.add_argument("--lora-routing", choices=["train", "threshold"],
                   help="routing while LoRA trains: hard Gumbel gates (train) or the calibrated decisions "
                   "inference makes (threshold); default: the preset's")
    p.add_argument("--lora-distill", type=float, metavar="W",
                   help="mix KL to the dense model's next-token distribution into the LoRA loss with weight W "
                   "in [0, 1] (default: the preset's)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints of an interrupted run "
                   "(with any number of processes)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="run on N processes (torch.distributed, gloo): the same as `torchrun --standalone "
                   "--nproc-per-node N -m irc convert ...`; each batch is split over the processes and the "
                   "result equals one process's (docs/multi-gpu.md)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-dense-eval", action="store_true", help="do not evaluate the dense model")
    p.add_argument("--json", action="store_true", help="print the run's summary as one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from irc.cache import check_output
    from irc.cli.common import emit_json, info
    from irc.errors import UserError
    from irc.train.convert import ConvertConfig, convert
    from irc.train.distributed import launch, launched_world_size, process_group

    overrides = {}
    if args.router_steps is not None:
        overrides["router_steps"] = args.router_steps
    if args.lora_steps is not None:
        overrides["lora_steps"] = args.lora_steps
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
        overrides["batch_size"] = args.batch_size
    if args.lora_routing is not None:
        overrides["lora_routing"] = args.lora_routing
    if args.lora_distill is not None:
        overrides["lora_distill"] = args.lora_distill
    config = ConvertConfig.from_preset(
        args.sparsity, args.preset, flops_saved=args.flops_saved,
        fold_epsilon=None if args.no_fold else args.fold_epsilon, fold_min_saving=args.fold_min_saving,
        refine_steps=args.refine_steps, variant=args.variant, data=args.data, eval_data=args.eval_data,
        seed=args.seed, dtype=args.dtype, lff_rank=args.lff_rank, lff_activation=args.lff_form,
        lff_method=args.lff_fit, kv_policy=args.kv_policy, router_init=not args.no_router_init,
        eval_tokens=args.eval_tokens, evaluate_dense=not args.no_dense_eval,
        **overrides,
    )
    check_output(args.out)  # before any work
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and launched_world_size() == 1:
        if args.nproc > config.batch_size and config.variant not in ("static", "static-lff"):
            raise UserError(f"--nproc {args.nproc}: a batch of {config.batch_size} rows cannot be split over "
                            f"{args.nproc} processes; pass --batch-size {args.nproc} (or more) or fewer processes")
        return launch(args.nproc, _without_nproc(args.argv))
    start = time.perf_counter()
    log = (lambda line: print(line, file=sys.stderr)) if args.json else info
    with process_group() as w:  # under torchrun: join the others (one process: nothing)
        summary = convert(args.model, args.out, config, resume=args.resume, overwrite=args.overwrite,
                          show_progress=not args.json, log=log)
    if not w.is_main:
        return 0
    if args.json:
        emit_json(summary)
        return 0
    ev = summary["evaluation"]
    sp = ev["sparsity"]
    flops = ev["flops_per_token"]
    by_kind = ", ".join(f"{k} {v:.2f}" for k, v in sp["by_kind"].items() if v is not None)
    dense = ev.get("dense_perplexity")
    info("stages      " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["training"]["seconds"].items()))
    info(f"perplexity  dense {dense:.2f} → routed {ev['perplexity']:.2f}" if dense else
         f"perplexity  routed {ev['perplexity']:.2f}")
    target = lambda kind: " target " + (f"{getattr(args, kind):.2f}," if getattr(args, kind) is not None else "–,")  # noqa: E731
    info(f"sparsity   {target('sparsity')} achieved {sp['overall']:.3f} ({by_kind})")
    flops_target = f"target {100 * config.flops_saved:.1f}%, " if config.flops_saved is not None else ""
    info(f"FLOPs       {flops['dense'] / 1e6:.1f} → {flops['routed'] / 1e6:.1f} MFLOP/token "
         f"({flops_target}{100 * flops['saved']:.1f}% saved, routers and forecasters included)")
    fold = summary.get("fold")
    if fold:
        n_fold = len(fold["folded"])
        how = {h: sum(1 for v in fold["folded"].values() if v == h) for h in ("forecast", "plain")}
        info(f"folded      {n_fold} of {fold['routers_before']} units (ε {fold['epsilon']}: {how['forecast']} "
             f"forecaster-only, {how['plain']} plain); {fold['routers_after']} keep routers")
    ppl = f"ppl {dense:.2f}→{ev['perplexity']:.2f}" if dense else f"ppl {ev['perplexity']:.2f}"
    info(f"PASSED convert {time.perf_counter() - start:.1f}s sparsity={sp['overall']:.3f} "
         f"flops_saved={flops['saved']:.3f} {ppl} out={args.out}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line the launched processes run: this one without ``--nproc N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
