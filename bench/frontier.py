"""The quality–compute frontier on SmolLM2-135M: perplexity against FLOPs saved.

Rows, at FLOP budgets of 10, 20, 30 and 40% (``--budgets``):

- ``informed-sparsity`` — the paper's objective: trained and calibrated for the
  unit sparsity whose uniform execute fraction would save the budget's FLOPs
  (it lands wherever its learned allocation puts it: attention is cheap per unit);
- ``informed-flops``    — trained and calibrated for the FLOP budget (``--flops-saved``);
- ``informed-folded``   — that model folded at ε = 0.05 (``irc fold``) and recalibrated;
- ``informed-folded-decode`` (not in the default grid: ``--methods``) — folded as ``informed-folded``,
  and every route saving under 0.2% of the FLOPs per token folded plain too (``irc fold
  --min-saving 0.002``: routes that cost a decode step more than they skip), then recalibrated;
- ``informed-folded-refined`` (not in the default grid: ``--methods``) — ``informed-folded-decode``,
  then 50 LoRA steps on the folded model under its own decisions, the folded units' deltas
  included, and recalibrated (``irc fold --min-saving 0.002 --refine-steps 50``);
- ``static-lff``        — whole units replaced by their forecasters, chosen greedily;
- ``skip`` (SkipGPT), ``static`` (ShortGPT), ``mod`` (Mixture-of-Depths) at the budget;
- ``informed-lora`` (not in the default grid: ``--methods``) — ``informed-flops`` followed by the
  paper's stage 4, LoRA (rank 16, α 32, q/v/gate) for half as many steps as router training, for
  presets without LoRA (the standard preset has its own LoRA stage: its informed rows are these).

Where a row's convert trains LoRA, the same routers without it (the checkpoint before the LoRA
stage, calibrated alike) are evaluated too: the row's ``without_lora`` figures, a paired ablation.
``--quick-at 0.10,0.40`` runs every row of those budgets with the quick preset (marked in the table).

Every row but ``informed-folded`` is a full ``irc convert``; evaluation on the
wiki held-out split (first 20,480 tokens, windows of 1024, bf16). For informed
rows the table also gives the units that are near-static on held-in data
(≤ 5% or ≥ 95% of non-sink tokens executed), the units folded, and with
``--speed`` the ONNX Runtime prefill speedup over dense at T = 1024
(``irc bench --backend ort``). JSON, Markdown and the plot are rewritten after
every row; ``--resume`` keeps rows already measured, ``--only`` picks rows.

    .venv/bin/python bench/frontier.py --resume                            # the whole grid
    .venv/bin/python bench/frontier.py --resume --only informed-flops@0.20 --speed
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irc.benchmark.results import results_path  # noqa: E402

BUDGETS = (0.10, 0.20, 0.30, 0.40)
METHODS = ("informed-sparsity", "informed-flops", "informed-folded", "static-lff", "skip", "static", "mod")
INFORMED = ("informed-sparsity", "informed-flops", "informed-folded", "informed-folded-decode",
            "informed-folded-refined", "informed-lora",
            "informed-flops-r300", "informed-folded-r300", "informed-flops-gumbel", "informed-folded-gumbel")
FOLD_EPSILON = 0.05
DECODE_MIN_SAVING = 0.002  # informed-folded-decode: irc fold --min-saving
REFINE_STEPS = 50  # informed-folded-refined: irc fold --refine-steps (batch 4 × 512, lr 1e-3: irc fold's defaults)
FOLDS = {"informed-folded": (0.0, 0), "informed-folded-decode": (DECODE_MIN_SAVING, 0),
         "informed-folded-refined": (DECODE_MIN_SAVING, REFINE_STEPS)}  # method → (min saving, refine steps)
STYLE = {  # method → (label, matplotlib format)
    "informed-sparsity": ("informed, unit sparsity (paper)", "o--"),
    "informed-flops": ("informed, FLOP budget", "o-"),
    "informed-folded": ("informed, FLOP budget, folded", "s-"),
    "informed-folded-decode": ("informed, FLOP budget, folded for decoding (min saving 0.2%)", "D-"),
    "informed-folded-refined": ("informed, FLOP budget, folded for decoding, LoRA refined", "*-"),
    "static-lff": ("static forecaster replacement", "^-"),
    "skip": ("skip (SkipGPT)", "v:"),
    "static": ("static (ShortGPT)", "d:"),
    "mod": ("mod (Mixture-of-Depths)", "x:"),
    "informed-lora": ("informed, FLOP budget, + LoRA", "P-"),
    # rows measured before the standard preset had its LoRA stage (300 router steps, no LoRA)
    "informed-flops-r300": ("informed, FLOP budget, 300 router steps, no LoRA", "o:"),
    "informed-folded-r300": ("informed, FLOP budget, 300 router steps, no LoRA, folded", "s:"),
    # rows measured while the standard preset's LoRA trained under Gumbel gates at lr 3e-4
    "informed-flops-gumbel": ("informed, FLOP budget, LoRA under Gumbel gates", "o-."),
    "informed-folded-gumbel": ("informed, FLOP budget, LoRA under Gumbel gates, folded", "s-."),
}


def key(method: str, budget: float) -> str:
    return f"{method}@{budget:.2f}"


def write(out: Path, result: dict) -> None:
    results_path(out, ".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = result["rows"]
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    lines = [
        "# The quality–compute frontier (SmolLM2-135M)",
        "",
        f"![perplexity against FLOPs saved]({results_path(out, '.png').name})",
        "",
        f"Perplexity on the wiki held-out split (first {result['eval_tokens']:,} tokens, windows of 1024, bf16) "
        "against the FLOPs per token saved (routers and forecasters counted, at the execute fractions reached on "
        "that text). Each row is an `irc convert` (training on wiki:train, calibration on its last windows); "
        "`informed-folded` is the `informed-flops` model of the same budget folded at ε = 0.05 and recalibrated; "
        "`informed-folded-decode` also folds plain every route that saves under 0.2% of the FLOPs per token "
        "(`irc fold --min-saving 0.002`) before recalibrating; `informed-folded-refined` is that model after 50 "
        "LoRA steps on it, folded units' deltas included, and recalibrated (`irc fold --min-saving 0.002 "
        "--refine-steps 50`). "
        "Near-static: units executing ≤ 5% or ≥ 95% of held-in non-sink tokens (of 60). ORT speedup: "
        "`irc bench --backend ort` at T = 1024 (measured alone on the machine).",
        "",
        "Commands, in the order they ran (each adds or replaces the rows it names): "
        + "; ".join(f"`{c}`" for c in result.get("commands", [result["command"]])) + f". {result['machine']}. "
        f"{'Complete.' if result['complete'] else 'Partial: rows not yet run are missing (the grid runs across sessions with --resume).'}",
        "",
        "| method | budget | preset | perplexity | × dense | FLOPs saved | unit sparsity | attn s | MLP s "
        "| near-static | folded | routers | ORT speedup T=1024 | convert time | without LoRA |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda v, f="{:.2f}": "–" if v is None else f.format(v)  # noqa: E731
    order = {m: i for i, m in enumerate(("dense", *STYLE))}
    for r in sorted(rows, key=lambda r: (r["budget"], order[r["method"]])):
        kinds = r.get("sparsity_by_kind") or {}
        lines.append("| " + " | ".join([
            r["method"], f"{100 * r['budget']:.0f}%", r.get("preset", "–"), f"{r['perplexity']:.2f}",
            f"{r['perplexity'] / dense:.2f}×" if dense else "–", f"{100 * r['flops_saved']:.1f}%",
            fmt(r.get("unit_sparsity")), fmt(kinds.get("attn")), fmt(kinds.get("mlp")),
            fmt(r.get("near_static"), "{}"), fmt(r.get("folded"), "{}"), fmt(r.get("routers"), "{}"),
            fmt(r.get("ort_speedup"), "{:.2f}×"), fmt(r.get("seconds"), "{:.0f} s"), _without_lora_cell(r),
        ]) + " |")
    notes = [n for n in result.get("notes", [])] + [f"{r['method']} {100 * r['budget']:.0f}%: {r['note']}"
                                                  for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    results_path(out, ".md").write_text("\n".join(lines) + "\n")
    plot(results_path(out, ".png"), rows, dense)


def _without_lora_cell(r: dict) -> str:
    w = r.get("without_lora")
    return "–" if not w else f"{w['perplexity']:.2f} @ {100 * w['flops_saved']:.1f}%"


def plot(path: Path, rows: list[dict], dense: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5), dpi=120)
    if dense:
        ax.axhline(dense, color="black", lw=1, label=f"dense ({dense:.2f})")
    for method in STYLE:
        pts = sorted((100 * r["flops_saved"], r["perplexity"], r.get("preset")) for r in rows if r["method"] == method)
        if not pts:
            continue
        label, style = STYLE[method]
        presets = sorted({p for _, _, p in pts if p})
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{label} [{'/'.join(presets)}]",
                          ms=6)
        quick = [p for p in pts if p[2] == "quick"]
        if quick and len(presets) > 1:  # quick-preset points of a mixed line: hollow markers over the filled ones
            ax.plot([p[0] for p in quick], [p[1] for p in quick], line.get_marker(), ms=8, mfc="white", color=line.get_color(),
                    mec=line.get_color(), ls="none")
    ax.set_yscale("log")
    xs = [100 * r["flops_saved"] for r in rows]
    ax.set_xlim(-1, max([45.0, *xs]) + 2)  # the whole budget range, so points read against each other
    ax.set_xlabel("FLOPs per token saved (%)")
    ax.set_ylabel("perplexity, wiki held-out (log)")
    ax.set_title("SmolLM2-135M: quality vs compute (hollow markers: quick preset on a mixed line)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no point hidden
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    plt.close(fig)


def _entry(method: str, budget: float, preset: str, summary: dict) -> dict:
    ev = summary["evaluation"]
    fold = summary.get("fold") or {}
    return {"method": method, "budget": budget, "preset": preset, "perplexity": ev["perplexity"],
            "flops_saved": ev["flops_per_token"]["saved"], "unit_sparsity": ev["sparsity"]["overall"],
            "sparsity_by_kind": ev["sparsity"]["by_kind"], "routers": ev.get("routers"),
            "folded": len(fold.get("folded", {})) if fold else 0,
            # the stages' own times: a resumed convert's wall time counts only what it ran
            "seconds": round(sum(summary["training"]["seconds"].values()), 1), "config": summary["training"]["config"]}


def run_convert(method: str, budget: float, preset: str, out_dir: Path) -> dict:
    from irc.errors import UserError
    from irc.eval.flops import sparsity_for_flops
    from irc.models import load_model
    from irc.plan import RoutingPlan
    from irc.train.convert import ConvertConfig, convert
    from irc.train.fold import held_in_fractions, near_static

    overrides = {"evaluate_dense": False, "fold_epsilon": None}  # folding is a row of its own
    if method == "informed-sparsity":
        arch = load_model("smollm2-135m", dtype="bf16").arch
        s = sparsity_for_flops(arch, RoutingPlan(), 1024, budget)
        config = ConvertConfig.from_preset(round(s, 4), preset, **overrides)
    else:
        if method == "informed-lora":
            from irc.train.convert import PRESETS

            overrides["lora_steps"] = PRESETS[preset].get("lora_steps") or PRESETS[preset]["router_steps"] // 2
        variant = "informed" if method.startswith("informed") else method
        config = ConvertConfig.from_preset(None, preset, flops_saved=budget, variant=variant, **overrides)
    snapshot = out_dir.parent / f".{out_dir.name}.routers.safetensors"
    work = out_dir.parent / f".{out_dir.name}.irc-work"
    kept = out_dir.parent / f".{out_dir.name}.pre-lora.irc-work"

    def keep_routers(stage: str, info: dict) -> None:
        # the routers before LoRA, from the convert's own checkpoint (run or resumed): the paired
        # ablation; and the whole work directory up to there, so a row redone with other LoRA
        # settings resumes from its routers (convert re-runs the stages whose settings changed)
        if stage == "routers" and config.lora_steps > 0:
            shutil.copyfile(work / "stage-routers.safetensors", snapshot)
            if kept.exists():
                shutil.rmtree(kept)
            shutil.copytree(work, kept)

    if config.lora_steps > 0 and kept.is_dir() and not work.exists():
        print(f"    resuming from the routers kept in {kept.name}", flush=True)
        shutil.copytree(kept, work)
    # resume=True: a row interrupted (session end, kill) continues from its checkpoints next time
    try:
        summary = convert("smollm2-135m", out_dir, config, overwrite=True, resume=True, log=print,
                          on_stage=keep_routers)
    except UserError as e:
        if "another configuration" not in str(e):
            raise
        print(f"    {e}: starting the row over", flush=True)
        shutil.rmtree(work)
        summary = convert("smollm2-135m", out_dir, config, overwrite=True, resume=True, log=print,
                          on_stage=keep_routers)
    entry = _entry(method, budget, preset, summary)
    if config.lora_steps > 0 and snapshot.is_file():
        entry["without_lora"] = without_lora(out_dir, snapshot, config)
        print(f"    without LoRA: perplexity {entry['without_lora']['perplexity']:.2f} "
              f"flops saved {entry['without_lora']['flops_saved']:.3f}", flush=True)
    if method.startswith("informed"):
        import irc
        from irc.data.windows import make_windows

        routed = irc.load(out_dir)
        entry["near_static"] = near_static(held_in_fractions(routed, _held_in(routed, make_windows)))
    return entry


def without_lora(out_dir: Path, snapshot: Path, config) -> dict:
    """The converted model with its routing tensors as they were before LoRA (B = 0: no delta),
    calibrated on the convert's held-in windows to the same budget and evaluated alike."""
    from safetensors.torch import load_file

    import irc
    from irc.data import load_corpus, token_stream
    from irc.eval.calibrate import calibrate_thresholds
    from irc.eval.routed import evaluate_routed, inference_mode, routed_budget
    from irc.train.convert import split_held_in

    routed = irc.load(out_dir)
    routed.load_routing_state(load_file(snapshot))
    _, calib = split_held_in(token_stream(load_corpus(config.data), routed.tokenizer), config)
    budget = routed_budget(routed, sparsity=config.sparsity, flops_saved=config.flops_saved, seq_len=calib.shape[1])
    calibrate_thresholds(routed, calib, budget=budget)
    inference_mode(routed, None)
    heldout = token_stream(load_corpus(config.eval_data), routed.tokenizer)
    ev = evaluate_routed(routed, heldout, seq_len=config.eval_seq_len, max_tokens=config.eval_tokens)
    return {"perplexity": ev["perplexity"], "flops_saved": ev["flops_per_token"]["saved"],
            "unit_sparsity": ev["sparsity"]["overall"]}


def _held_in(routed, make_windows):
    from irc.data import load_corpus, token_stream

    stream = token_stream(load_corpus("wiki:train"), routed.tokenizer)
    return make_windows(stream[len(stream) - 4 * 1024:], 1024, 4)


def run_folded(budget: float, source: Path, out_dir: Path, method: str = "informed-folded") -> dict:
    """Fold the informed-flops model of this budget and evaluate it: ``FOLDS[method]`` says whether
    routes saving too little fold plain too (``informed-folded-decode``) and how many LoRA steps then
    refine the folded model (``informed-folded-refined``; the others retrain nothing)."""
    import irc
    from irc.data import load_corpus, token_stream
    from irc.data.windows import make_windows
    from irc.eval.routed import evaluate_routed, routed_budget
    from irc.train.fold import fold_routed, refine_folded, refine_windows
    from irc.train.lora_train import LoRATrainConfig

    t = time.perf_counter()
    min_saving, refine_steps = FOLDS[method]
    routed = irc.load(source)
    calib = _held_in(routed, make_windows)
    budget_of = lambda r: routed_budget(r, flops_saved=budget, seq_len=1024)  # noqa: E731
    record = fold_routed(routed, calib, FOLD_EPSILON, min_saving=min_saving, budget=budget_of)
    if refine_steps:  # as irc fold --refine-steps does, with its defaults
        stream = token_stream(load_corpus("wiki:train"), routed.tokenizer)
        record["refine"] = refine_folded(routed, refine_windows(stream, 4 * 1024, refine_steps, 4, 512),
                                         LoRATrainConfig(steps=refine_steps, batch_size=4, lr=1e-3,
                                                         routing="threshold"), calib=calib, budget=budget_of)
    heldout = token_stream(load_corpus("wiki:heldout"), routed.tokenizer)
    ev = evaluate_routed(routed, heldout, seq_len=1024, max_tokens=20480)
    routed.records = {**routed.records, "fold": record,
                      "evaluation": {**routed.records.get("evaluation", {}), **{k: ev[k] for k in
                                     ("perplexity", "tokens", "sparsity", "flops_per_token")}}}
    routed.save(out_dir, overwrite=True)
    return {"method": method, "budget": budget, "preset": routed.records["training"]["config"]["preset"],
            "perplexity": ev["perplexity"], "flops_saved": ev["flops_per_token"]["saved"],
            "unit_sparsity": ev["sparsity"]["overall"], "sparsity_by_kind": ev["sparsity"]["by_kind"],
            "routers": len(routed.units), "folded": len(record["folded"]), "near_static": record["near_static"],
            "seconds": round(time.perf_counter() - t, 1)}


def ort_speedup(model_dir: Path) -> float:
    from irc.benchmark.speed import SpeedConfig, bench_speed

    result = bench_speed(str(model_dir), "ort", SpeedConfig(seq_lens=(1024,)))
    return result.rows[0]["speedup"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default=",".join(f"{b:.2f}" for b in BUDGETS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--informed-preset", default="standard", choices=["quick", "standard"],
                   help="preset of the informed rows (default standard)")
    p.add_argument("--baseline-preset", default="quick", choices=["quick", "standard"],
                   help="preset of the skip / mod rows (default quick); static and static-lff train no routers "
                   "and take the informed preset")
    p.add_argument("--quick-at", default="",
                   help="comma-separated budgets whose rows all use the quick preset (where the grid cannot fit)")
    p.add_argument("--redo", help="comma-separated row keys to measure again (their old rows are replaced)")
    p.add_argument("--only", help="comma-separated row keys, e.g. informed-flops@0.20,static-lff@0.20")
    p.add_argument("--resume", action="store_true", help="keep rows already in the JSON")
    p.add_argument("--speed", action="store_true",
                   help="measure the ORT prefill speedup at T=1024 of informed rows (exports ONNX: minutes each)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "frontier"))
    p.add_argument("--work", default=str(ROOT / "runs" / "frontier"))
    args = p.parse_args()

    import torch

    out, work = Path(args.out), Path(args.work)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ("python bench/frontier.py " + " ".join(sys.argv[1:])).strip()
    result = {"command": command, "eval_tokens": 20480, "rows": [], "complete": False, "notes": [],
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    if args.resume and results_path(out, ".json").is_file():
        previous = json.loads(results_path(out, ".json").read_text())
        result["rows"], result["notes"] = previous["rows"], previous.get("notes", [])
        earlier = previous.get("commands", [previous.get("command")])
        result["commands"] = earlier + ([command] if command not in earlier else [])
    else:
        result["commands"] = [command]
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    wanted = [("dense", 0.0)] + [(m, b) for b in budgets for m in methods]
    if args.only:
        keep = set(args.only.split(","))
        wanted = [(m, b) for m, b in wanted if key(m, b) in keep]
    redo = set(args.redo.split(",")) if args.redo else set()
    quick_at = {float(b) for b in args.quick_at.split(",") if b}
    done = {key(r["method"], r["budget"]): r for r in result["rows"] if key(r["method"], r["budget"]) not in redo}
    for method, budget in wanted:
        k = key(method, budget)
        row = done.get(k)
        if row is None:
            print(f"=== {k}", flush=True)
            t = time.perf_counter()
            if method == "dense":
                from irc.data import load_corpus, token_stream
                from irc.eval import evaluate_perplexity
                from irc.models import load_model

                base = load_model("smollm2-135m", dtype="bf16")
                r = evaluate_perplexity(base.model, token_stream(load_corpus("wiki:heldout"), base.tokenizer),
                                        seq_len=1024, max_tokens=20480)
                row = {"method": "dense", "budget": 0.0, "perplexity": r.perplexity, "flops_saved": 0.0,
                       "unit_sparsity": 0.0}
            elif method in FOLDS:
                source = work / key("informed-flops", budget)
                if not (source / "irc.json").is_file():
                    print(f"    skipped: needs {key('informed-flops', budget)} first", flush=True)
                    continue
                row = run_folded(budget, source, work / k, method)
            else:
                # static-lff fits forecasters and trains nothing else: it gets the informed rows' data
                # (forecaster windows, held-in windows), so the two differ only in routing
                trains_routers = method in ("skip", "mod")
                preset = args.baseline_preset if trains_routers else args.informed_preset
                if budget in quick_at:
                    preset = "quick"
                row = run_convert(method, budget, preset, work / k)
            row["row_seconds"] = round(time.perf_counter() - t, 1)
            result["rows"] = [r for r in result["rows"] if key(r["method"], r["budget"]) != k] + [row]
            done[k] = row
            write(out, result)
            print(f"    perplexity {row['perplexity']:.2f} flops saved {row['flops_saved']:.3f}", flush=True)
        if args.speed and method in INFORMED and row.get("ort_speedup") is None:
            print(f"=== {k}: ORT speedup at T=1024", flush=True)
            row["ort_speedup"] = ort_speedup(work / k)
            write(out, result)
            print(f"    speedup {row['ort_speedup']:.2f}x", flush=True)
    all_keys = {key(m, b) for m in METHODS for b in BUDGETS} | {key("dense", 0.0)}
    result["complete"] = all_keys <= {key(r["method"], r["budget"]) for r in result["rows"]}
    write(out, result)
    print(f"wrote {results_path(out, '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
