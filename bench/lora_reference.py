"""What LoRA buys the dense model: the reference for the routed models' LoRA stage.

The standard preset's LoRA stage trains rank-16 adapters (q/v/gate) on wiki:train
windows with routing on. Part of what it buys is adaptation to the corpus, which
the dense model would get too. This runs the same LoRA stage (the same windows of
the training stream, the same steps, batch, learning rate and schedule) with every
unit executing, then measures perplexity on the wiki held-out split as the
frontier does (first 20,480 tokens, windows of 1024, bf16).

    .venv/bin/python bench/lora_reference.py        # → docs/results/lora_reference.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irc.benchmark.results import results_path  # noqa: E402


def lora_windows(stream, config):
    """The windows the convert's LoRA stage trains on, taken by the convert's own stages in their
    order (the calibration tail held out first)."""
    from irc.train.convert import STAGES, Job, split_held_in

    train, _ = split_held_in(stream, config)
    job = Job(config=config, source="", base=None, stream=train, calib=None, work=None, log=print,
              show_progress=False, on_stage=lambda name, info: None)
    for stage in STAGES:
        if stage.data is not None and stage.applies(config):
            stage.data(job)
    return job.windows["lora"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="standard")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "lora_reference"))
    args = p.parse_args()

    import torch

    from irc.data import load_corpus, token_stream
    from irc.eval import evaluate_perplexity
    from irc.models import load_model
    from irc.plan import RoutingPlan
    from irc.routing import route
    from irc.train.convert import ConvertConfig
    from irc.train.lora_train import LoRATrainConfig, train_lora

    config = ConvertConfig.from_preset(None, args.preset, flops_saved=0.2)
    if config.lora_steps <= 0:
        raise SystemExit(f"the {args.preset} preset trains no LoRA")
    torch.manual_seed(config.seed)
    base = load_model("smollm2-135m", dtype=config.dtype)
    heldout = token_stream(load_corpus("wiki:heldout"), base.tokenizer)
    windows = lora_windows(token_stream(load_corpus(config.data), base.tokenizer), config)
    routed = route(base, RoutingPlan(lora_rank=config.lora_rank))
    routed.set_routing("dense")
    before = evaluate_perplexity(routed, heldout, seq_len=1024, max_tokens=20480).perplexity
    t = time.perf_counter()
    record = train_lora(routed, windows, LoRATrainConfig(steps=config.lora_steps, batch_size=config.batch_size,
                                                         lr=config.lora_lr, routing="dense"))
    seconds = time.perf_counter() - t
    routed.set_routing("dense")
    after = evaluate_perplexity(routed, heldout, seq_len=1024, max_tokens=20480).perplexity
    command = "python bench/lora_reference.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "preset": args.preset, "lora_steps": config.lora_steps,
              "batch_size": config.batch_size, "lora_lr": config.lora_lr, "lora_rank": config.lora_rank,
              "train_windows": int(windows.shape[0]), "dense_perplexity": before,
              "dense_lora_perplexity": after, "lora": record, "seconds": round(seconds, 1),
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    out = Path(args.out)
    results_path(out, ".json").write_text(json.dumps(result, indent=2) + "\n")
    results_path(out, ".md").write_text("\n".join([
        "# LoRA on the dense model (the reference for the LoRA stage)", "",
        f"`{result['command']}` ({result['machine']}): the {args.preset} preset's LoRA stage "
        f"({config.lora_steps} steps, batch {config.batch_size}×{config.train_seq_len}, lr {config.lora_lr}, "
        f"rank {config.lora_rank}, q/v/gate) on the same wiki:train windows, every unit executing.", "",
        "| model | perplexity (wiki held-out, 20,480 tokens) |", "|---|---:|",
        f"| dense | {before:.2f} |", f"| dense + LoRA | {after:.2f} |", "",
    ]))
    print(f"dense {before:.2f} → dense + LoRA {after:.2f} ({seconds:.0f} s of LoRA)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
