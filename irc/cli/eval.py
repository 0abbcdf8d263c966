"""``irc eval MODEL``: perplexity, tokens scored, tokens/s and peak memory."""

from __future__ import annotations

import argparse
import sys
import time

# below this many scored tokens a perplexity moves by several percent from one corpus sample to the next
FEW_TOKENS = 1000
# a dial this far from the training budget is outside what the routers were trained for
FAR_FROM_TRAINED = 0.2


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity of a model on a corpus",
        description="Perplexity of MODEL (a Hugging Face directory, a .gguf file, or "
        "smollm2-135m) on a corpus, with tokens scored, tokens/s and peak memory.",
    )
    p.add_argument("model", help="routed model directory (from irc convert), Hugging Face directory, "
                   ".gguf file, or smollm2-135m")
    p.add_argument("--sparsity", type=float, default=None,
                   help="routed models: move the sparsity dial (recalibrate the thresholds on held-in "
                   "data) before evaluating")
    p.add_argument("--flops-saved", type=float, default=None, metavar="F",
                   help="routed models: move the dial to a compute target instead (recalibrate the thresholds "
                   "so that F of the FLOPs per token are saved, routers and forecasters counted)")
    p.add_argument("--calib-data", default="wiki:train",
                   help="held-in corpus for --sparsity / --flops-saved (default wiki:train; its last 4 windows)")
    p.add_argument("--data", default="wiki:heldout",
                   help="corpus: wiki[:train|heldout], or a .txt/.jsonl file or folder [:SPLIT] "
                   "(default: wiki:heldout)")
    p.add_argument("--seq-len", type=int, default=1024, help="window length (default 1024)")
    p.add_argument("--stride", type=int, default=None,
                   help="window stride; smaller than --seq-len overlaps windows (default: no overlap)")
    p.add_argument("--max-tokens", type=int, default=20480,
                   help="evaluate the first N tokens of the corpus; 0 for all (default 20480)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"],
                   help="compute precision (default bf16)")
    p.add_argument("--bos", default="none", choices=["none", "document", "window"],
                   help="BOS policy (default none: SmolLM2 adds no BOS)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from irc.cli.common import emit_json, fmt_int, info
    from irc.data import load_corpus, token_stream
    from irc.data.tokens import bos_id
    from irc.errors import UserError
    from irc.eval import evaluate_perplexity
    from irc.models import load_model

    if args.max_tokens < 0:
        raise UserError(f"--max-tokens must be 0 (all) or positive, got {args.max_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    for flag, value in (("--sparsity", args.sparsity), ("--flops-saved", args.flops_saved)):
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    from irc.routing import is_routed_dir

    if is_routed_dir(args.model):
        return _run_routed(args)
    if args.model.endswith(".onnx"):
        return _run_onnx(args)
    if args.model.endswith(".engine"):
        return _run_engine(args)
    if args.sparsity is not None or args.flops_saved is not None:
        raise UserError("--sparsity and --flops-saved apply to routed model directories (made by irc convert)")
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype)
    corpus = load_corpus(args.data, default_split="heldout")
    if loaded.arch.max_positions and args.seq_len > loaded.arch.max_positions:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's {loaded.arch.max_positions} positions; "
                        f"use --seq-len {loaded.arch.max_positions} or less")
    stream = token_stream(corpus, loaded.tokenizer, args.bos)
    bos = bos_id(loaded.tokenizer) if args.bos == "window" else None
    max_tokens = args.max_tokens or None
    if not args.json:
        info(f"model       {loaded.describe()}, loaded in {loaded.load_seconds:.1f}s")
        info(f"weights     sha256 {loaded.weights_sha256}")
        n = min(len(stream), max_tokens or len(stream))
        info(f"data        {corpus.spec}: {fmt_int(len(corpus.documents))} documents, "
             f"{fmt_int(len(stream))} tokens; evaluating the first {fmt_int(n)} in windows of "
             f"{args.seq_len}" + (f", stride {args.stride}" if args.stride else ", no overlap"))
    result = evaluate_perplexity(
        loaded.model,
        stream,
        seq_len=args.seq_len,
        stride=args.stride,
        max_tokens=max_tokens,
        bos=bos,
        batch_size=args.batch_size,
        show_progress=not args.json,
    )
    total = time.perf_counter() - start
    _warn(result.tokens)
    if args.json:
        emit_json({
            "model": args.model,
            "weights_sha256": loaded.weights_sha256,
            "dtype": args.dtype,
            "data": corpus.spec,
            "bos": args.bos,
            **result.to_dict(),
            "load_seconds": round(loaded.load_seconds, 3),
            "total_seconds": round(total, 3),
        })
        return 0
    info(f"perplexity  {result.perplexity:.3f}  ({fmt_int(result.tokens)} tokens scored in "
         f"{result.windows} windows)")
    info(f"speed       {result.tokens_per_s:,.0f} tokens/s ({result.seconds:.1f}s), peak memory "
         f"{result.peak_memory_mb:,.0f} MB ({result.memory_kind})")
    info(f"PASSED eval {total:.1f}s ppl {result.perplexity:.2f} tokens/s "
         f"{result.tokens_per_s:,.0f} model={args.model}")
    return 0


def _run_routed(args: argparse.Namespace) -> int:
    import irc
    from irc.cli.common import emit_json, fmt_int, info
    from irc.data import load_corpus, token_stream
    from irc.errors import UserError
    from irc.eval.routed import evaluate_routed, recalibrate

    start = time.perf_counter()
    if args.sparsity is not None and args.flops_saved is not None:
        raise UserError("give one dial: --sparsity S or --flops-saved F, not both")
    for flag, value in (("--sparsity", args.sparsity), ("--flops-saved", args.flops_saved)):
        if value is not None and not 0.0 <= value < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    routed = irc.load(args.model, dtype=args.dtype)
    if routed.arch.max_positions and args.seq_len > routed.arch.max_positions:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's {routed.arch.max_positions} positions; "
                        f"use --seq-len {routed.arch.max_positions} or less")
    calibration = recalibrate(routed, sparsity=args.sparsity, flops_saved=args.flops_saved,
                              calib_data=args.calib_data, seq_len=args.seq_len, name=args.model,
                              show_progress=not args.json)
    training = routed.records.get("training", {})
    trained = training.get("sparsity")
    trained_flops = training.get("flops_saved")
    corpus = load_corpus(args.data, default_split="heldout")
    stream = token_stream(corpus, routed.tokenizer, args.bos)
    result = evaluate_routed(routed, stream, seq_len=args.seq_len, stride=args.stride,
                             max_tokens=args.max_tokens or None,
                             sparsity=args.sparsity,
                             show_progress=not args.json)
    sp, flops = result["sparsity"], result["flops_per_token"]
    _warn(result["tokens"], *((sp["overall"], trained, "sparsity") if trained is not None else
                              (flops["saved"], trained_flops, "FLOPs saved")))
    if args.json:
        emit_json({"model": args.model, "routed": True, "variant": routed.plan.variant, "data": corpus.spec,
                   "trained_sparsity": trained, "trained_flops_saved": trained_flops,
                   "requested_sparsity": args.sparsity, "requested_flops_saved": args.flops_saved,
                   "routers": len(routed.units), "folded": {n: u.how for n, u in getattr(routed, "folded", {}).items()},
                   **{k: v for k, v in result.items()}, "calibration": calibration})
        return 0
    dense = routed.records.get("evaluation", {}).get("dense_perplexity")
    folded = getattr(routed, "folded", {})
    trained_for = (f"FLOPs saved {trained_flops:.2f}" if trained_flops is not None else f"sparsity {trained}")
    info(f"model       {args.model}: {routed.plan.variant} routing of {routed.base.describe()}, "
         f"{len(routed.units)} routed units" + (f" + {len(folded)} folded" if folded else "")
         + f", trained for {trained_for}")
    info(f"data        {corpus.spec}: {fmt_int(result['tokens'])} tokens scored in windows of {args.seq_len}")
    info(f"perplexity  {result['perplexity']:.3f}" + (f"  (dense {dense:.3f}, recorded at convert time)" if dense else ""))
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in sp["by_kind"].items() if v is not None)
    info(f"sparsity    {sp['overall']:.3f} achieved ({kinds})"
         + (f"; requested {args.sparsity:.2f}" if args.sparsity is not None else ""))
    layers = " ".join(f"{k}:{v:.2f}" for k, v in sp["by_layer"].items() if v is not None)
    info(f"by layer    {layers}")
    info(f"FLOPs       {flops['dense'] / 1e6:.1f} → {flops['routed'] / 1e6:.1f} MFLOP/token "
         f"({100 * flops['saved']:.1f}% saved, routers and forecasters included)"
         + (f"; requested {100 * args.flops_saved:.1f}%" if args.flops_saved is not None else ""))
    info(f"speed       {result['tokens_per_s']:,.0f} tokens/s")
    info(f"PASSED eval {time.perf_counter() - start:.1f}s ppl {result['perplexity']:.2f} "
         f"sparsity={sp['overall']:.3f} flops_saved={flops['saved']:.3f} model={args.model}")
    return 0


def _warn(tokens: int, achieved: float | None = None, trained: float | None = None, what: str = "") -> None:
    """Warnings on stderr (``--json`` keeps stdout clean): a verdict that cannot be trusted is not silent."""
    if tokens < FEW_TOKENS:
        print(f"warning: only {tokens:,} tokens scored; a perplexity over fewer than {FEW_TOKENS:,} is noise "
              "(use a larger corpus or --max-tokens)", file=sys.stderr)
    if achieved is not None and trained is not None and abs(achieved - trained) > FAR_FROM_TRAINED:
        print(f"warning: {what} {achieved:.3f} achieved, far from the {trained:.2f} the model was trained for; "
              "its routers and forecasters were not trained for this budget", file=sys.stderr)


def _run_engine(args: argparse.Namespace) -> int:
    """A TensorRT engine (``irc export trt``): the same evaluation as an ONNX file."""
    from irc.exporters.tensorrt import Engine

    return _run_onnx(args, model_class=Engine, backend="tensorrt")


def _run_onnx(args: argparse.Namespace, model_class=None, backend: str = "onnxruntime") -> int:
    from irc.cli.common import emit_json, fmt_int, info
    from irc.data import load_corpus, token_stream
    from irc.errors import UserError
    from irc.eval import evaluate_perplexity
    from irc.exporters.onnx_runtime import OnnxModel

    if args.sparsity is not None or args.flops_saved is not None:
        raise UserError(f"--sparsity and --flops-saved apply to routed model directories; a {backend} file's "
                        "routing is fixed")
    start = time.perf_counter()
    model = (model_class or OnnxModel)(args.model)
    corpus = load_corpus(args.data, default_split="heldout")
    stream = token_stream(corpus, model.tokenizer(), args.bos)
    result = evaluate_perplexity(model, stream, seq_len=args.seq_len, stride=args.stride,
                                 max_tokens=args.max_tokens or None, batch_size=args.batch_size,
                                 show_progress=not args.json)
    _warn(result.tokens)
    m = model.manifest
    if args.json:
        emit_json({"model": args.model, "backend": backend, "data": corpus.spec,
                   "routing": m.get("routing"), "capacity": m.get("capacity"), **result.to_dict()})
        return 0
    info(f"model       {args.model} ({backend}; routing {m.get('routing')}, capacity {m.get('capacity')})")
    info(f"data        {corpus.spec}: {fmt_int(result.tokens)} tokens scored in windows of {args.seq_len}")
    info(f"perplexity  {result.perplexity:.3f}")
    info(f"speed       {result.tokens_per_s:,.0f} tokens/s")
    info(f"PASSED eval {time.perf_counter() - start:.1f}s ppl {result.perplexity:.2f} backend={backend} "
         f"model={args.model}")
    return 0
