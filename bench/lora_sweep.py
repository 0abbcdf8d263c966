"""Which LoRA stage earns its keep: variants trained from the same routers, evaluated alike.

A frontier row that trained LoRA keeps its routing tensors as they were before
LoRA (``runs/frontier/.METHOD@BUDGET.routers.safetensors``). Each variant here
starts from those routers (LoRA ``B`` = 0), trains the LoRA stage on the
convert's own LoRA windows (``lora_windows``: the same stages' data in the same
order) with its learning rate, routing mode and loss, then calibrates to the
row's budget on the convert's held-in windows, evaluates, folds at ε = 0.05
(recalibrating) and evaluates again: perplexity on the wiki held-out split
(first 20,480 tokens, windows of 1024, bf16), as the frontier measures it.

    .venv/bin/python bench/lora_sweep.py                 # every variant → docs/results/lora_sweep.{json,md}
    .venv/bin/python bench/lora_sweep.py --resume --only threshold-1e-3

Routing modes (``irc.train.lora_train``): ``train`` = hard Gumbel gates at τ = 1
(the paper's stage 4, the standard preset's so far); ``threshold`` = the
calibrated decisions inference will make (calibrated before LoRA too).
``distill`` w mixes in KL to the dense base model's next-token distribution.
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
sys.path.insert(0, str(ROOT / "bench"))

from irc.benchmark.results import results_path  # noqa: E402

# name → (learning rate, routing, distill weight)
VARIANTS: dict[str, tuple[float, str, float]] = {
    "train-3e-4": (3e-4, "train", 0.0),  # the standard preset's stage before this sweep
    "train-1e-3": (1e-3, "train", 0.0),
    "threshold-1e-3": (1e-3, "threshold", 0.0),
    "threshold-1e-3-kd0.5": (1e-3, "threshold", 0.5),
}
FOLD_EPSILON = 0.05


def run_variant(name: str, model_dir: Path, snapshot: Path, steps: int | None) -> dict:
    import torch
    from lora_reference import lora_windows
    from safetensors.torch import load_file

    import irc
    from irc.data import load_corpus, token_stream
    from irc.eval.calibrate import calibrate_thresholds
    from irc.eval.routed import evaluate_routed, routed_budget
    from irc.models import load_model
    from irc.train.convert import ConvertConfig, split_held_in
    from irc.train.fold import fold_routed
    from irc.train.lora_train import LoRATrainConfig, train_lora

    lr, routing, distill = VARIANTS[name]
    routed = irc.load(model_dir)
    if routed.folded:
        raise SystemExit(f"{model_dir} is folded; give the unfolded row (its routers snapshot is pre-fold)")
    routed.load_routing_state(load_file(snapshot))
    config = ConvertConfig.from_dict(routed.records["training"]["config"])
    torch.manual_seed(config.seed)
    stream = token_stream(load_corpus(config.data), routed.tokenizer)
    windows = lora_windows(stream, config)
    _, calib = split_held_in(stream, config)
    heldout = token_stream(load_corpus(config.eval_data), routed.tokenizer)

    def budget(r):
        return routed_budget(r, sparsity=config.sparsity, flops_saved=config.flops_saved, seq_len=calib.shape[1])

    def evaluate() -> dict:
        ev = evaluate_routed(routed, heldout, seq_len=config.eval_seq_len, max_tokens=config.eval_tokens)
        return {"perplexity": ev["perplexity"], "flops_saved": ev["flops_per_token"]["saved"],
                "unit_sparsity": ev["sparsity"]["overall"]}

    teacher = None
    if distill > 0:
        base = load_model(json.loads((model_dir / "irc.json").read_text())["base"]["source"], dtype=config.dtype)

        def teacher(ids):
            return base.model(ids).logits

    t = time.perf_counter()
    if routing == "threshold":
        calibrate_thresholds(routed, calib, budget=budget(routed))
    steps = steps or config.lora_steps
    record = train_lora(routed, windows[: steps * config.batch_size],
                        LoRATrainConfig(steps=steps, batch_size=config.batch_size, lr=lr, routing=routing,
                                        distill=distill), teacher=teacher)
    lora_seconds = time.perf_counter() - t
    calibrate_thresholds(routed, calib, budget=budget(routed))
    unfolded = evaluate()
    fold = fold_routed(routed, calib, FOLD_EPSILON, budget=budget)
    folded = evaluate()
    return {"variant": name, "lr": lr, "routing": routing, "distill": distill, "steps": steps,
            "batch_size": config.batch_size, "lora": record, "lora_seconds": round(lora_seconds, 1),
            "unfolded": unfolded, "folded": {**folded, "folded": len(fold["folded"]), "routers": len(routed.units)}}


def dense_perplexity(model: Path) -> float:
    """The dense model's perplexity as the frontier measured it (its dense row)."""
    frontier = json.loads((ROOT / "docs" / "results" / "frontier.json").read_text())
    rows = frontier["rows"] if isinstance(frontier, dict) else frontier
    return next(r["perplexity"] for r in (rows.values() if isinstance(rows, dict) else rows) if r["method"] == "dense")


def write(results: dict, out: Path, meta: dict) -> None:
    results_path(out, ".json").write_text(json.dumps({**meta, "variants": results}, indent=2) + "\n")
    dense = meta.get("dense_perplexity")
    lines = ["# LoRA stage variants (same routers, same windows)", "",
             f"Model: `{meta['model']}` (its routers before LoRA: `{meta['snapshot']}`); "
             f"{meta['machine']}. Perplexity on the wiki held-out split (20,480 tokens, windows of 1024, bf16); "
             f"× dense against {dense:.2f}. Commands, in the order they ran: "
             + "; ".join(f"`{c}`" for c in meta["commands"]) + ".", "",
             "| variant | lr | routing | distill | steps | last loss | perplexity | × dense | FLOPs saved "
             "| folded perplexity | × dense | FLOPs saved | folded | LoRA time |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        u, f = r["unfolded"], r["folded"]
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['routing']} | {r['distill']:g} | {r['steps']} "
                     f"| {r['lora']['last_loss']:.3f} | {u['perplexity']:.2f} | {u['perplexity'] / dense:.2f}× "
                     f"| {u['flops_saved']:.1%} | {f['perplexity']:.2f} | {f['perplexity'] / dense:.2f}× "
                     f"| {f['flops_saved']:.1%} | {f['folded']} | {r['lora_seconds']:.0f} s |")
    if meta.get("notes"):
        lines += ["", "Notes:", "", *[f"- {n}" for n in meta["notes"]]]
    results_path(out, ".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "frontier" / "informed-flops@0.20"))
    p.add_argument("--snapshot", default=None, help="routers before LoRA (default: the frontier's snapshot)")
    p.add_argument("--only", default=None, help="comma-separated variants")
    p.add_argument("--steps", type=int, default=None, help="LoRA steps (default: the row's preset)")
    p.add_argument("--resume", action="store_true", help="keep variants already in the JSON")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "lora_sweep"))
    args = p.parse_args()

    import torch

    model = Path(args.model)
    snapshot = Path(args.snapshot) if args.snapshot else model.parent / f".{model.name}.routers.safetensors"
    for path in (model, snapshot):
        if not path.exists():
            raise SystemExit(f"{path} does not exist (run the frontier row first: bench/frontier.py)")
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    command = ("python bench/lora_sweep.py " + " ".join(sys.argv[1:])).strip()
    previous = json.loads(results_path(out, ".json").read_text()) if args.resume and results_path(out, ".json").exists() else {}
    results = previous.get("variants", {})
    dense = previous.get("dense_perplexity") or dense_perplexity(model)
    meta = {"model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
            "snapshot": str(snapshot.relative_to(ROOT) if snapshot.is_relative_to(ROOT) else snapshot),
            "dense_perplexity": dense, "commands": previous.get("commands", []) + [command],
            "notes": previous.get("notes", []),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    for name in names:
        if name in results:
            print(f"{name}: kept from {results_path(out, '.json').name}")
            continue
        print(f"--- {name}")
        results[name] = run_variant(name, model, snapshot, args.steps)
        r = results[name]
        print(f"{name}: {r['unfolded']['perplexity']:.2f} @ {r['unfolded']['flops_saved']:.1%}, folded "
              f"{r['folded']['perplexity']:.2f} @ {r['folded']['flops_saved']:.1%}")
        write(results, out, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
