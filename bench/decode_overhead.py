"""Where routed decoding spends its time: one decode step, four ways.

After a --prompt-len prefill of --batch rows, times --steps greedy decode steps of the
routed model's decode graph (torch, --dtype) in four settings that isolate the routing
cost from the compute it saves:

- dense:      the base model's decode step, no router and no folded unit (the baseline,
              ``irc.generation.decoder.dense_decoder``; files before 2026-12-06 ran the routed
              graph in dense mode, where a folded model's forecast-folded units still forecast);
- threshold:  the calibrated decisions (what ``irc generate`` runs);
- all-exec:   thresholds at −∞: routers and decisions run, every unit executes
              (pure routing overhead);
- none-exec:  thresholds at +∞: every unit is approximated (the most routing can
              save, forecasts included);
- unrouted:   the base model's decode graph as captured, before any pass (dense without
              the static cache's in-place writes and grouped-query attention);
- threshold (F.linear), all-exec (F.linear): as threshold and all-exec, with the
              routers' and forecasters' products through ``F.linear`` instead of
              ``irc.nn.small_linear`` (oneDNN's per-call setup in bf16: the ablation).

LoRA weights (W + BA) are computed once per run, as ``generate`` does.

--backend ort: the same decomposition of the ONNX Runtime decode files (fp32; exported once,
``irc.exporters.onnx_decode``): dense is the dense file, threshold / all-exec / none-exec
the threshold file with its thresholds as calibrated, at −∞ and at +∞ (the file's
threshold initializers overridden when the session is made,
``SessionOptions.add_initializer``: the same graph, other decisions). At batch 1 these
run their one-token steps through the step file (``OnnxDecodeConfig.step_file``); the
``(general file)`` rows run every step through the general file instead (what the step
file buys), and ``dense (expanded attention, general file)`` is the dense general file
exported with ``grouped_attention=False`` (keys and values expanded to every query head
each step): against ``dense (general file)``, what grouped attention buys.

    .venv/bin/python bench/decode_overhead.py --model runs/bench-quality-standard/informed-0.25
    .venv/bin/python bench/decode_overhead.py --model runs/frontier/informed-folded@0.20 --batch 8
    .venv/bin/python bench/decode_overhead.py --model runs/frontier/informed-folded@0.20 --backend ort
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import irc  # noqa: E402
from irc.benchmark.results import results_path  # noqa: E402
from irc.generation import row_kernels  # noqa: E402
from irc.generation.decoder import decoder_for, dense_decoder  # noqa: E402

SETTINGS = {"dense": ("dense", None), "threshold": ("threshold", None),
            "all-exec": ("threshold", -1e9), "none-exec": ("threshold", 1e9)}
ABLATED = {"threshold (F.linear)": ("threshold", None), "all-exec (F.linear)": ("threshold", -1e9)}


@contextlib.contextmanager
def plain_linear():
    """Routers and forecasters through ``F.linear`` (what they ran before ``small_linear``)."""
    import torch.nn.functional as F

    import irc.nn.forecaster
    import irc.nn.router

    saved = irc.nn.router.small_linear, irc.nn.forecaster.small_linear
    irc.nn.router.small_linear = irc.nn.forecaster.small_linear = F.linear
    try:
        yield
    finally:
        irc.nn.router.small_linear, irc.nn.forecaster.small_linear = saved


def step_ms(routed, decoder, ids, mode, threshold, steps, graph=None) -> float:
    """Milliseconds per decode step; ``graph``: run this unrouted decode graph instead."""
    if graph is not None:
        def step(i, m, p):  # the decoders' step kernels (irc.generation.row_kernels), as decoder.step
            with row_kernels.for_rows(i.numel(), decoder.aten_rows()):
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
        with torch.inference_mode(), parametrize.cached():
            mask = torch.ones_like(ids)
            B = ids.shape[0]
            logits, past = step(ids, mask, decoder.empty_cache(B, capacity=ids.shape[1] + steps + 1))
            token = logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
                logits, past = step(token, mask, past)
                token = logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - start) / steps * 1e3
    finally:
        for name, value in saved.items():
            routed.units[name].threshold.copy_(value)


def threshold_options(path, theta: float):
    """ORT session options that set every threshold initializer of the file at ``path`` to ``theta``
    (the same graph, other decisions), and the values they hold: keep those as long as the session."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer
             if i.name.endswith(".threshold")]
    if not names:
        raise SystemExit(f"{path}: no threshold initializers to override")
    options = ort.SessionOptions()
    values = [ort.OrtValue.ortvalue_from_numpy(np.array(theta, np.float32)) for _ in names]
    for name, value in zip(names, values, strict=True):
        options.add_initializer(name, value)
    return options, values


def ort_decoders(routed) -> dict:
    """Per setting, an ``OrtDecoder`` (see the module doc); the threshold file's session remade per θ."""
    from irc.exporters.onnx_decode import OnnxDecodeConfig, OrtDecoder, load_or_export_decode

    def export(routing, **kw):
        routed.set_routing(routing)
        return load_or_export_decode(routed, None, OnnxDecodeConfig(routing=routing, **kw),
                                     log=lambda line: print(line, file=sys.stderr))

    decoders = {"dense": export("dense", step_file=True), "dense (general file)": export("dense", step_file=False),
                "dense (expanded attention, general file)": export("dense", grouped_attention=False, step_file=False),
                "threshold": export("threshold", step_file=True),
                "threshold (general file)": export("threshold", step_file=False)}
    path, general = decoders["threshold"].path, decoders["threshold (general file)"].path
    for name, theta in (("all-exec", -1e9), ("none-exec", 1e9)):
        for label, file in ((name, path), (f"{name} (general file)", general)):
            options, values = threshold_options(file, theta)  # the step file beside it has the same names
            decoders[label] = OrtDecoder(file, session_options=options)
            decoders[label].overrides = values  # the sessions read them: they must outlive them
    return decoders


def ort_step_ms(decoder, ids, steps) -> float:
    from irc.generation import GenerationConfig, generate

    result = generate(decoder, ids, torch.ones_like(ids), GenerationConfig(max_new_tokens=steps + 1,
                                                                           stop_at_eos=False))
    return result.decode_seconds / (result.decode_tokens / ids.shape[0]) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/smollm2-s25")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--backend", default="torch", choices=["torch", "ort"],
                   help="ort: the ONNX Runtime decode files (fp32), see the module doc")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "decode_overhead"))
    args = p.parse_args()

    from irc.benchmark.speed import text_inputs
    from irc.generation.capture import capture_decode

    if args.backend == "ort":
        args.dtype = "fp32"
    routed = irc.load(args.model, dtype=args.dtype)
    ids, _ = text_inputs(routed.base.tokenizer, args.batch, args.prompt_len)
    if args.backend == "ort":
        decoders = ort_decoders(routed)
        times = {name: [] for name in decoders}
        for _ in range(args.repeats):  # settings interleaved, so noise hits all alike
            for name, decoder in decoders.items():
                times[name].append(ort_step_ms(decoder, ids, args.steps))
    else:
        decoder, dense = decoder_for(routed), dense_decoder(routed)
        unrouted = capture_decode(routed.base.model).gm
        times = {name: [] for name in (*SETTINGS, "unrouted", *ABLATED)}
        for _ in range(args.repeats):  # settings interleaved, so noise hits all alike
            for name, (mode, threshold) in SETTINGS.items():
                graph = dense if name == "dense" else decoder
                times[name].append(step_ms(routed, graph, ids, mode, threshold, args.steps))
            times["unrouted"].append(step_ms(routed, decoder, ids, "dense", None, args.steps, graph=unrouted))
            with plain_linear():
                for name, (mode, threshold) in ABLATED.items():
                    times[name].append(step_ms(routed, decoder, ids, mode, threshold, args.steps))
    ms = {name: statistics.median(v) for name, v in times.items()}
    # dense/setting within each repeat (run back to back), median over repeats: drift between repeats cancels
    paired = {name: statistics.median(d / t for d, t in zip(times["dense"], v, strict=True))
              for name, v in times.items()}
    command = "python bench/decode_overhead.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results_path(out, ".json").write_text(json.dumps(
        {"command": command.strip(), "model": args.model, "backend": args.backend, "batch": args.batch,
         "dtype": args.dtype, "paired_vs_dense": paired,
         "prompt_len": args.prompt_len, "steps": args.steps,
         "repeats": args.repeats, "ms_per_step": ms, "all_runs": times, "torch": torch.__version__,
         "threads": torch.get_num_threads()}, indent=2) + "\n")
    runtime = f"torch {torch.__version__}" if args.backend == "torch" else f"ONNX Runtime {_ort_version()}"
    lines = [f"# Routed decoding at batch {args.batch} ({args.backend}): routing overhead vs what it saves", "",
             f"Model `{args.model}` ({runtime}, {args.dtype}, {torch.get_num_threads()} threads); "
             f"{args.steps} greedy decode steps after a {args.prompt_len}-token prompt; median of "
             f"{args.repeats} interleaved repeats; " + ("the static cache (written in place)." if args.backend == "torch"
             else "the cache kept in ONNX Runtime by I/O binding."), "", f"Command: `{command.strip()}`", "",
             "| setting | ms per step | vs dense | paired |", "|---|---:|---:|---:|"]
    for name, value in ms.items():
        lines.append(f"| {name} | {value:.2f} | {ms['dense'] / value:.2f}× | {paired[name]:.2f}× |")
    lines += ["", f"Routing overhead (all-exec − dense): {ms['all-exec'] - ms['dense']:.2f} ms per step; "
              f"the most routing can save (dense − none-exec): {ms['dense'] - ms['none-exec']:.2f} ms. "
              "vs dense: dense median / setting median; paired: the median over repeats of dense / setting "
              "in the same repeat."]
    results_path(out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    raise SystemExit(main())
