"""``irc run MODEL "text"``: run any model irc handles on a prompt and show what it predicts."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a model (.onnx, .engine, routed dir, base model) on a prompt",
        description="Tokenize TEXT, run MODEL on it (ONNX Runtime for .onnx, TensorRT for .engine, PyTorch "
        "for routed directories and base models), print the most likely next tokens and a short greedy "
        "continuation. Exported files are prefill graphs without a KV cache, so each new token re-runs the "
        "whole sequence; `irc generate` decodes with a cache.",
    )
    p.add_argument("model", help=".onnx file, .engine file, routed model directory, or base model")
    p.add_argument("text", help="the prompt")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy continuation length (default 16)")
    p.add_argument("--top", type=int, default=5, help="how many next-token candidates to show (default 5)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"],
                   help="PyTorch precision (routed directories and base models; default bf16)")
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from irc.backends import open_model
    from irc.cli.common import emit_json, info
    from irc.errors import UserError

    if args.max_new_tokens < 0 or args.top < 1:
        raise UserError("--max-new-tokens must be ≥ 0 and --top ≥ 1")
    if not args.text:
        raise UserError("the prompt is empty; give some text to run on")
    start = time.perf_counter()
    model = open_model(args.model, dtype=args.dtype)
    tok = model.tokenizer
    ids = torch.tensor([tok.encode(args.text)], dtype=torch.long)  # [1, T]
    if ids.shape[1] == 0:
        raise UserError("the prompt tokenizes to nothing")
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(ids).float()  # [1, T, V]
        prefill_s = time.perf_counter() - t0
        probs = logits[0, -1].softmax(-1)
        top = probs.topk(args.top)
        candidates = [{"token": tok.decode([int(i)]), "id": int(i), "p": float(p)}
                      for p, i in zip(top.values, top.indices, strict=True)]
        new = []
        eos = getattr(tok, "eos_token_id", None)
        t0 = time.perf_counter()
        for _ in range(args.max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            logits = model(ids).float()
        gen_s = time.perf_counter() - t0
    continuation = tok.decode(new)
    result = {"model": args.model, "backend": model.backend, "prompt_tokens": int(ids.shape[1]) - len(new),
              "next_tokens": candidates, "continuation": continuation, "new_tokens": len(new),
              "prefill_seconds": prefill_s, "continuation_seconds": gen_s}
    if args.json:
        emit_json(result)
        return 0
    info(f"model       {model.description} [{model.backend}]")
    info(f"prompt      {result['prompt_tokens']} tokens, prefill {prefill_s * 1e3:.1f} ms")
    info("next token  " + "  ".join(f"{c['token']!r} {c['p']:.3f}" for c in candidates))
    info(f"greedy      {args.text}\u2502{continuation}")
    rate = f", {len(new) / gen_s:.1f} tok/s without a KV cache" if new and gen_s > 0 else ""
    info(f"PASSED run {time.perf_counter() - start:.1f}s backend={model.backend} new_tokens={len(new)}{rate}")
    return 0
