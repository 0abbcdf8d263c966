"""``irc generate OUT|MODEL "prompt"``: routed decoding with a KV cache, streamed."""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a routed model (KV cache, per-token routing)",
        description="Generate a continuation of PROMPT with a routed model directory (threshold routing, "
        "every unit decides per token) or a base model (dense). Prints the text, then tokens/s while "
        "decoding, the achieved execute fraction, the FLOPs saved and the KV-cache bytes per token.",
    )
    p.add_argument("model", help="routed model directory (from irc convert), Hugging Face directory, "
                   ".gguf file, or smollm2-135m")
    p.add_argument("prompt", help="the prompt (with --chat: the user's message)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--backend", default="torch", choices=["torch", "ort"],
                   help="torch (default), or ort: ONNX Runtime on the exported prefill/decode graph "
                   "(exported and verified on first use, kept under --onnx-dir)")
    p.add_argument("--onnx-dir", default=None,
                   help="--backend ort: directory of the decode export (default: in the irc cache)")
    p.add_argument("--routing", default=None, choices=["threshold", "dense"],
                   help="threshold (default for routed models) or dense (every unit runs)")
    p.add_argument("--kv-cache", default="static", choices=["static", "copy"],
                   help="static (default): preallocated cache buffers written in place each step (torch), "
                   "the cache kept in ONNX Runtime's OrtValues by I/O binding (ort); copy: each step returns "
                   "a new cache with the past copied into it (the functional cache, for comparison)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"],
                   help="compute precision (default: bf16 with torch, fp32 with ort)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end, nothing else")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import irc
    from irc.cli.common import emit_json, info
    from irc.errors import UserError
    from irc.generation import GenerationConfig, generate
    from irc.generation.decoder import decoder_for, dense_decoder
    from irc.generation.stats import decode_flops, decode_kv_bytes, kv_cache_line
    from irc.routing import is_routed_dir

    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, kv_cache=args.kv_cache)
    if not args.prompt:
        raise UserError("the prompt is empty")
    start = time.perf_counter()
    routed_dir = is_routed_dir(args.model)
    dtype = args.dtype or ("fp32" if args.backend == "ort" else "bf16")
    routed = irc.load(args.model, dtype=dtype) if routed_dir else irc.route(irc.load_model(args.model, dtype=dtype))
    routing = args.routing or ("threshold" if routed_dir else "dense")
    routed.set_routing(routing, record=True)
    tokenizer = routed.tokenizer
    ids = _prompt_ids(tokenizer, args.prompt, args.chat)
    config = _fit_positions(config, ids.shape[1], routed.arch.max_positions, quiet=args.json)
    # dense: the base model's decode step (a folded model's folded units unfolded), the dense cost
    model = dense_decoder(routed) if routing == "dense" else routed
    if args.backend == "ort":
        from irc.exporters.onnx_decode import OnnxDecodeConfig, load_or_export_decode

        model = load_or_export_decode(routed, args.onnx_dir, OnnxDecodeConfig(routing=routing),
                                      log=lambda line: print(line, file=sys.stderr))
    stream = _Streamer(tokenizer, echo=args.stream and not args.json)
    try:
        result = generate(model, ids, config=config, on_token=stream)
    except KeyboardInterrupt:
        stream.keep(quiet=args.json)  # what was generated before Ctrl-C is not lost
        raise
    if not stream.echo:
        stream = None
    text = tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    seconds = time.perf_counter() - start
    context = ids.shape[1] + (result.new_tokens - 1) / 2
    # an ONNX file without a decisions output reports none (n/a): count FLOPs as dense there
    fractions = {} if routing == "dense" or result.execute_fraction is None else result.execute_fractions
    flops = decode_flops(routed.arch, routed.plan, fractions, context)
    if routing == "dense":  # the base model: every unit runs, no router, nothing folded
        result.execute_fraction = 1.0
        result.execute_fractions = {name: 1.0 for name in routed.units}
        flops = {**flops, "routed": flops["dense"], "saved": 0.0}
    kinds = _by_kind(result.execute_fractions)
    kv = decode_kv_bytes(routed, model, 4 if args.backend == "ort" else None)  # ORT: fp32
    # torch: the kernel of a decode step's bf16 products (irc.generation.row_kernels); ORT: its own
    aten_rows = None if args.backend == "ort" else (dense_decoder(routed) if routing == "dense"
                                                    else decoder_for(routed)).aten_rows()
    if args.json:
        emit_json({"model": args.model, "backend": args.backend, "routing": routing, "kv_cache": args.kv_cache,
                   "text": text,
                   "prompt_tokens": int(ids.shape[1]), **result.to_dict(), "flops_per_token": flops,
                   "kv_cache_bytes": kv, "execute_by_kind": kinds, "step_gemm_aten_rows": aten_rows,
                   "seconds": seconds})
        return 0
    if stream is not None:
        stream.finish()
    else:
        info(text)
    info()
    exec_line = "n/a" if result.execute_fraction is None else (
        f"{result.execute_fraction:.3f}" + "".join(f", {k} {v:.3f}" for k, v in kinds.items()))
    gemm = "" if not aten_rows else f", ATen GEMM ≤ {aten_rows} rows"
    info(f"decode      {result.decode_tokens} tokens in {result.decode_seconds:.2f}s: "
         f"{result.tokens_per_s:.1f} tokens/s ({args.backend}, {dtype}, {routing}, {args.kv_cache} cache{gemm}); "
         f"prompt {ids.shape[1]} tokens, "
         f"prefill {result.prefill_seconds:.2f}s")
    info(f"execute     {exec_line} (while decoding)")
    info(f"FLOPs       {flops['dense'] / 1e6:.1f} → {flops['routed'] / 1e6:.1f} MFLOP/token "
         f"({100 * flops['saved']:.1f}% saved, routers and forecasters included)")
    info(f"KV cache    {kv_cache_line(kv)}")
    frac = "n/a" if result.execute_fraction is None else f"{result.execute_fraction:.3f}"
    info(f"PASSED generate {seconds:.1f}s tokens/s {result.tokens_per_s:.1f} execute {frac} "
         f"flops saved {100 * flops['saved']:.1f}% backend={args.backend} new={result.new_tokens}")
    if result.new_tokens == 0:
        raise UserError("generated no tokens")
    return 0


def _prompt_ids(tokenizer, prompt: str, chat: bool):
    from irc.errors import UserError

    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: this model's tokenizer has no chat template; drop --chat to continue "
                            "the prompt as plain text")
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return out["input_ids"]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty")
    return ids


def _fit_positions(config, prompt_tokens: int, max_positions: int | None, *, quiet: bool):
    """Clamp ``max_new_tokens`` to the positions the model has left after the prompt."""
    import dataclasses

    from irc.errors import UserError
    from irc.generation.capture import MIN_CONTEXT

    if not max_positions:
        return config
    left = max_positions - max(prompt_tokens, MIN_CONTEXT)
    if left < 1:
        raise UserError(f"the prompt has {prompt_tokens} tokens and the model {max_positions} positions: "
                        "no room to generate; shorten the prompt")
    if config.max_new_tokens <= left:
        return config
    if not quiet:
        print(f"irc: --max-new-tokens {config.max_new_tokens} clamped to {left}, the positions the model "
              f"has left after the prompt ({max_positions} in all)", file=sys.stderr)
    return dataclasses.replace(config, max_new_tokens=left)


def _by_kind(fractions: dict) -> dict[str, float]:
    out = {}
    for kind in ("attn", "mlp"):
        values = [v for k, v in fractions.items() if k.endswith(kind) and v is not None]
        if values:
            out[kind] = sum(values) / len(values)
    return out


class _Streamer:
    """Prints the text of row 0 as it grows (decoding the whole row keeps multi-byte characters whole);
    with ``echo=False`` it only keeps the tokens, for ``keep`` on an interruption."""

    def __init__(self, tokenizer, echo: bool = True):
        self.tokenizer = tokenizer
        self.echo = echo
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, step: int, tokens) -> None:
        token = int(tokens[0])
        if token < 0:
            return
        self.tokens.append(token)
        if not self.echo:
            return
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()

    def keep(self, *, quiet: bool) -> None:
        """On an interruption: print what was generated so far (unless it was already streamed)."""
        if not self.echo and not quiet:
            sys.stdout.write(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if not quiet:
            self.finish()
        print(f"irc: interrupted after {len(self.tokens)} new tokens; the text above is what was generated",
              file=sys.stderr)
