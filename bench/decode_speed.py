"""Decode tokens/s of a routed model, dense vs routed, with PyTorch and ONNX Runtime.

For each backend and batch size: a prompt of --prompt-len real tokens per row
(consecutive windows of the wiki held-out split), then --new-tokens greedy
tokens (end-of-sequence ignored, so every run decodes the same count). Decode
tokens/s counts the tokens produced by decode steps (B per step) over the time
of the decode steps; prefill is timed apart. Dense is the base model's decode step
through the same machinery (``irc.generation.decoder.dense_decoder``; ONNX Runtime: the
``dense`` decode file, exported from it): no router and no folded unit. (Until
2026-12-06 it was the routed graph in ``dense`` mode, where a folded model's
forecast-folded units still forecast: a baseline that had folding's savings already.)
Routed is ``threshold`` routing.
Runs interleave dense and routed; each figure is the median of --repeats runs
after one warm-up run. PyTorch runs in --dtype (bf16 by default); ONNX Runtime
in fp32 (the decode export's precision; its threshold file routes behind ONNX
``If`` nodes, ``irc.nn.decode_branches``: an approximated token runs the forecaster
only, a forecast-folded unit runs nothing but its forecaster past the sinks). Each row also gives the
KV-cache bytes per token of context, dense and routed (forecast-folded attention
layers keep their sink slots only: ``irc.generation.stats.kv_cache_bytes``).

--kv-cache picks the cache machinery, the same for dense and routed
(``GenerationConfig.kv_cache``): ``static`` (default; torch: preallocated buffers
written in place, ``irc.generation.static_cache``; ORT: the cache kept in OrtValues
by I/O binding), ``copy`` (each step returns a new cache, the past copied into it),
or ``static,copy``: a row for each, interleaved like dense and routed. --gemm picks
the kernel of a torch decode step's bf16 products (``irc.generation.row_kernels``):
``auto`` (default: ATen's own for steps of a token or two where it measured faster,
else oneDNN), ``onednn``, ``aten``, or ``onednn,auto``: a row for each, interleaved.

--model takes several directories (a folded model and its unfolded twin: what
folding buys), --dtype several torch precisions. --hf-reference adds, per torch
precision and batch, the base model decoding through transformers itself (a greedy
loop over its own cache): the check that the dense side of every row is not a slow
baseline.

    .venv/bin/python bench/decode_speed.py --model runs/smollm2-s25   # docs/results/decode_speed.{md,json}
    .venv/bin/python bench/decode_speed.py --model runs/smollm2-s25 --kv-cache static,copy
    .venv/bin/python bench/decode_speed.py --model runs/smollm2-s25 --backends torch --gemm onednn,auto
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import irc  # noqa: E402
from irc.benchmark.results import results_path  # noqa: E402
from irc.generation import GenerationConfig, generate, row_kernels  # noqa: E402
from irc.generation.decoder import decoder_for, dense_decoder  # noqa: E402
from irc.generation.stats import decode_flops, decode_kv_bytes  # noqa: E402


def prompts(tokenizer, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from irc.data import load_corpus, token_stream

    stream = token_stream(load_corpus("wiki:heldout"), tokenizer, "none")
    if len(stream) < batch * length:
        raise SystemExit(f"the corpus has {len(stream)} tokens, fewer than {batch}×{length}")
    ids = torch.as_tensor(stream[: batch * length].astype("int64")).view(batch, length)
    return ids, torch.ones_like(ids)


DENSE_NOTE = ("dense: the base model's decode step through the same machinery (irc.generation.decoder.dense_decoder; "
              "ONNX Runtime: the dense decode file, exported from it), no router and no folded unit. Files written "
              "before 2026-12-06 took the routed graph in dense mode, whose forecast-folded units still forecast.")


def run_once(model, ids, mask, new_tokens: int, kv_cache: str) -> dict:
    result = generate(model, ids, mask, GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False,
                                                         kv_cache=kv_cache))
    return {"tokens_per_s": result.tokens_per_s, "prefill_s": result.prefill_seconds,
            "execute_fraction": result.execute_fraction, "execute_fractions": result.execute_fractions}


def kernels(routed, gemm: str) -> int | None:
    """Both torch decoders' bf16 step kernels (irc.generation.row_kernels): the rows up to which ATen's run."""
    os.environ[row_kernels.ENV] = gemm
    limits = set()
    for decoder in (dense_decoder(routed), decoder_for(routed)):
        decoder.reset_kernels()
        limits.add(decoder.aten_rows())
    assert len(limits) == 1, limits  # measured once, on the base model's weights: the same for both
    return limits.pop()


def bench_backend(backend: str, model: str, dtype: str, args, command: str) -> list[dict]:
    routed = irc.load(model, dtype=dtype)
    models = {}
    for mode in ("dense", "threshold"):
        if backend == "torch":  # dense: the base model's decode step (a folded model unfolded)
            models[mode] = dense_decoder(routed) if mode == "dense" else routed
        else:
            from irc.exporters.onnx_decode import OnnxDecodeConfig, load_or_export_decode

            routed.set_routing(mode)
            config = OnnxDecodeConfig(routing=mode, grouped_attention=args.ort_attention == "grouped",
                                      step_file=args.ort_step_file == "on")
            models[mode] = load_or_export_decode(routed, None, config, log=lambda line: print(line, file=sys.stderr))
    kv = decode_kv_bytes(routed, models["threshold"], 4 if backend == "ort" else None)  # ORT: fp32
    rows = []
    for batch in args.batch:
        ids, mask = prompts(routed.tokenizer, batch, args.prompt_len)
        gemms = args.gemm if backend == "torch" else [None]
        runs: dict[tuple, list[dict]] = {(c, g, m): [] for c in args.kv_cache for g in gemms
                                         for m in ("dense", "threshold")}
        limits = {}
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            for cache, gemm, mode in runs:
                if gemm is not None:
                    limits[gemm] = kernels(routed, gemm)
                routed.set_routing(mode, record=True)
                r = run_once(models[mode], ids, mask, args.new_tokens, cache)
                if repeat:
                    runs[cache, gemm, mode].append(r)
        for cache, gemm in dict.fromkeys((c, g) for c, g, _ in runs):
            row = _row(model, backend, dtype, batch, cache, {m: runs[cache, gemm, m] for m in ("dense", "threshold")},
                       kv, args, command)
            row["gemm"] = None if gemm is None else {"setting": gemm, "aten_rows": limits[gemm]}
            fractions = runs[cache, gemm, "threshold"][-1]["execute_fractions"]
            if fractions:  # ORT too: the decode file's decisions output
                context = args.prompt_len + (args.new_tokens - 1) / 2
                row["decode_flops"] = decode_flops(routed.arch, routed.plan, fractions, context)
            rows.append(row)
    return rows


@torch.no_grad()
def hf_reference(model: str, dtype: str, args, command: str) -> list[dict]:
    """The base model's own decode through transformers: a greedy loop over its DynamicCache."""
    routed = irc.load(model, dtype=dtype)
    base, tokenizer = routed.base.model.eval(), routed.tokenizer  # the base model, as loaded (no LoRA)
    rows = []
    for batch in args.batch:
        ids, mask = prompts(tokenizer, batch, args.prompt_len)
        speeds = []
        for repeat in range(args.repeats + 1):
            out = base(ids, attention_mask=mask, use_cache=True)
            past, token, full = out.past_key_values, out.logits[:, -1:].argmax(-1), mask
            start = time.perf_counter()
            for _ in range(args.new_tokens - 1):  # as generate: the first new token comes from prefill
                full = torch.cat([full, torch.ones_like(token)], dim=1)
                out = base(token, attention_mask=full, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if repeat:
                speeds.append(batch * (args.new_tokens - 1) / (time.perf_counter() - start))
        rows.append({"model": "base (transformers)", "backend": "hf", "dtype": dtype, "batch": batch,
                     "cache": "dynamic", "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "dense_tokens_per_s": statistics.median(speeds), "dense_runs": speeds, "command": command})
        print(f"hf    B={batch} {dtype}: {rows[-1]['dense_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return rows


def _row(model, backend, dtype, batch, cache, runs, kv, args, command) -> dict:
    med = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in runs.items()}
    # dense and routed run back to back in each repeat: their ratio there is immune to the machine's
    # drift between repeats (step times here swing ±20% within minutes)
    paired = statistics.median(r["tokens_per_s"] / d["tokens_per_s"]
                               for r, d in zip(runs["threshold"], runs["dense"], strict=True))
    row = {"model": model, "backend": backend, "dtype": dtype, "batch": batch, "cache": cache,
           "attention": args.ort_attention if backend == "ort" else "sdpa (enable_gqa)",
           "speedup_paired": paired,
           "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "dense_tokens_per_s": med["dense"],
           "routed_tokens_per_s": med["threshold"], "speedup": med["threshold"] / med["dense"],
           "execute_fraction": runs["threshold"][-1]["execute_fraction"],
           "kv_bytes_per_token": {"dense": kv["dense_per_token"], "routed": kv["per_token"]}, "kv_cache": kv,
           "dense_runs": [r["tokens_per_s"] for r in runs["dense"]],
           "routed_runs": [r["tokens_per_s"] for r in runs["threshold"]], "command": command}
    print(f"{backend:5s} B={batch} {cache} cache: dense {med['dense']:.1f} tok/s, routed "
          f"{med['threshold']:.1f} tok/s ({row['speedup']:.2f}×, paired {paired:.2f}×), execute "
          f"{row['execute_fraction']}", file=sys.stderr)
    return row


def _gemm(row) -> str:
    g = row.get("gemm")
    if g is None:
        return "–"
    how = f"ATen ≤ {g['aten_rows']} rows" if g["aten_rows"] else "oneDNN"
    return how if g["setting"] == "auto" else f"{how} ({g['setting']})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/smollm2-s25",
                   help="routed model directories, comma-separated (e.g. a folded model and its unfolded twin)")
    p.add_argument("--dtype", default="bf16", help="PyTorch precisions, comma-separated (ORT runs fp32)")
    p.add_argument("--hf-reference", action="store_true",
                   help="also time the base model's own transformers decode (per torch precision and batch)")
    p.add_argument("--backends", default="torch,ort")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-cache", default="static",
                   help="static (default: written in place / I/O-bound), copy (a new cache each step), "
                   "or static,copy: rows for both")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--ort-attention", default="grouped", choices=["grouped", "expanded"],
                   help="the ONNX files' grouped-query attention: over the cache's own heads (default), or the "
                   "exporter's SDPA over keys and values expanded every step (OnnxDecodeConfig.grouped_attention)")
    p.add_argument("--ort-step-file", default="off", choices=["on", "off"],
                   help="on: one-token steps at batch 1 run the one-token step file (OnnxDecodeConfig.step_file); "
                   "off (default): every step runs the general file")
    p.add_argument("--gemm", default="auto",
                   help="torch bf16 kernels of a decode step's few rows (IRC_DECODE_GEMM, irc.generation.row_kernels): "
                   "auto (default: measured), onednn, aten, or a comma-separated list: rows for each, interleaved")
    p.add_argument("--out", default=str(ROOT / "docs/results/decode_speed"))
    args = p.parse_args()
    args.batch = [int(b) for b in args.batch.split(",")]
    args.kv_cache = args.kv_cache.split(",")
    args.gemm = args.gemm.split(",")
    if not set(args.gemm) <= {"auto", "onednn", "aten"}:
        p.error(f"--gemm {','.join(args.gemm)}: each of auto, onednn, aten")
    for cache in args.kv_cache:
        GenerationConfig(kv_cache=cache)  # validates
    if args.threads:
        torch.set_num_threads(args.threads)
    command = ".venv/bin/python bench/decode_speed.py " + shlex.join(sys.argv[1:])
    rows = []
    models, dtypes = args.model.split(","), args.dtype.split(",")
    for model in models:
        for backend in args.backends.split(","):
            for dtype in dtypes if backend == "torch" else ["fp32"]:
                rows += bench_backend(backend, model, dtype, args, command)
    if args.hf_reference:
        for dtype in dtypes:
            rows += hf_reference(models[0], dtype, args, command)
    out = args.out
    results_path(out, ".json").parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "processor": platform.processor(), "cpus": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "models": models}
    results_path(out, ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Decode speed: dense vs routed",
        "",
        f"Models {', '.join(f'`{m}`' for m in models)}, {args.prompt_len}-token prompt per row (wiki held-out), {args.new_tokens} new "
        f"tokens, greedy; decode tokens/s = tokens from decode steps (B per step) / decode time; median of "
        f"{args.repeats} interleaved runs after a warm-up. torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {meta['date']}. Generated by `bench/decode_speed.py`; the command is beside every figure.",
        "",
        "| model | backend | dtype | B | KV cache | step GEMM | dense tok/s | routed tok/s | speed-up | paired "
        "| execute fraction | decode FLOPs saved | KV B/token dense → routed | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["backend"] == "hf":
            lines.append(f"| {r['model']} | hf | {r['dtype']} | {r['batch']} | {r['cache']} | oneDNN | "
                         f"{r['dense_tokens_per_s']:.1f} | – | – | – | – | – | – | `{r['command']}` |")
            continue
        e = "n/a" if r["execute_fraction"] is None else f"{r['execute_fraction']:.3f}"
        saved = f"{100 * r['decode_flops']['saved']:.1f}%" if "decode_flops" in r else "n/a"
        lines.append(f"| `{r['model']}` | {r['backend']} | {r['dtype']} | {r['batch']} | {r['cache']} | "
                     f"{_gemm(r)} | {r['dense_tokens_per_s']:.1f} | "
                     f"{r['routed_tokens_per_s']:.1f} | {r['speedup']:.2f}× | {r['speedup_paired']:.2f}× | {e} | "
                     f"{saved} | "
                     f"{r['kv_bytes_per_token']['dense']:,} → {r['kv_bytes_per_token']['routed']:,} | "
                     f"`{r['command']}` |")
    attention = "over the cache's own key/value heads (grouped query rows, OnnxDecodeConfig.grouped_attention)" \
        if args.ort_attention == "grouped" else "the exporter's SDPA over keys and values expanded to every query " \
        "head each step (grouped_attention=False)"
    lines += ["", DENSE_NOTE,
              "", "speed-up: routed median / dense median; paired: the median over repeats of routed / dense "
              "in the same repeat (the two run back to back, so drift of the machine between repeats cancels).",
              "", "ONNX Runtime rows: the threshold file routes behind ONNX If nodes (each unit's skipped branch "
              f"does not run); the file's decisions output gives the execute fraction. Attention: {attention}. "
              + ("Batch 1: the one-token steps run the step file (static B = T = 1, one If per routed unit, "
                 "OnnxDecodeConfig.step_file), dense and routed alike." if args.ort_step_file == "on" else
                 "Every step runs the general file (--ort-step-file off)."),
              "", "KV B/token: KV-cache bytes per token of context; dense: every layer's cache grows with the "
              "context (the base model); routed: a forecast-folded attention layer keeps its n_sink sink slots "
              "only (a constant, not counted per token).",
              "", "KV cache: static: torch writes each step's keys and values in place into preallocated buffers "
              "(irc.generation.static_cache), ONNX Runtime keeps the cache in OrtValues by I/O binding (the file's "
              "Concat still copies the past inside ORT); copy: each step returns a new cache, the past copied "
              "into it. Dense and routed use the same machinery in every row.",
              "", "decode FLOPs saved: per decoded token, routers and forecasters counted, at the execute fractions "
              "of the row's last routed run and the mean context of its steps (irc.generation.stats.decode_flops); "
              "a decode step that only read weights would be 1 / (1 - saved) times faster.",
              "", "step GEMM (torch): the kernel of a decode step's bf16 products (irc.generation.row_kernels, "
              "IRC_DECODE_GEMM via --gemm): oneDNN, or ATen's own for steps of at most N tokens in all (auto: "
              "measured once on the base model's weights; dense and routed take the same); the prompt runs oneDNN.",
              "", "hf rows (--hf-reference): the base model through transformers (its forward over a "
              "DynamicCache, greedy, the same prompts), dense only: a reference for the dense columns."]
    results_path(out, ".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {results_path(out, '.md')} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
