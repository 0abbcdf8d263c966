"""Task quality of the frontier's points through lm-evaluation-harness: dense, informed, baseline.

Each model (``--models``: the dense base and routed directories of ``bench/frontier.py``) is
evaluated through irc's lm-eval backend (``irc.eval.lm_eval.IrcLM``, as ``irc lm-eval``) on
irc's offline tasks built from the wiki held-out split (``irc.eval.lm_eval_tasks``):

- ``irc_wiki_rolling`` — word / byte perplexity and bits per byte over whole documents, in
  rolling windows of the model's context (8192), the harness's ``wikitext`` protocol;
- ``irc_lastword`` — last-word accuracy and perplexity on passages, the LAMBADA protocol.

One task per ``simple_evaluate`` call on the same loaded model, so that each task reports its
own achieved unit sparsity and FLOPs saved (the backend's counters are reset in between:
rolling windows are thousands of tokens long, last-word passages about 70, and the always-
executed sink tokens weigh more in short ones). Routed models run at the dial they were saved
with. Every metric lm-eval returns is kept with its stderr (lm-eval gives none for the
rolling task's corpus-level perplexities). JSON and Markdown are rewritten after every
model × task row; ``--resume`` keeps rows already measured with the same limit on the same weights
(a routed directory's rows record the hash of its routing tensors; one replaced since is measured again).

    .venv/bin/python bench/tasks.py --resume        # → docs/results/tasks.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irc.benchmark.results import results_path  # noqa: E402

MODELS = ("smollm2-135m", "runs/frontier/informed-folded@0.20", "runs/frontier/informed-flops@0.20",
          "runs/frontier/static-lff@0.20")
TASKS = ("irc_wiki_rolling", "irc_lastword")
# rolling windows are 8192 tokens: one per pass (the fp32 log-probabilities alone are 1.6 GB a row);
# last-word passages are short and batch well (right-padding moves no threshold-routed decision)
BATCH_SIZE = {"irc_wiki_rolling": 1, "irc_lastword": 16}
# --limit is per task; by default every document: irc_wiki_rolling's 10 held-out documents (12 windows of
# up to 8192 tokens, ~2 min dense, ~6 min routed on one contended core) and irc_lastword's 336 passages
FACTS = ("achieved_sparsity", "sparsity_by_kind", "flops_saved", "flops_seq_len", "tokens_routed")
ARROW = {"acc": "↑"}  # every other metric here is a perplexity or bits per byte: lower is better


def label(model: str) -> str:
    return "dense" if model == "smollm2-135m" else Path(model).name


def resolve(model: str) -> str:
    """A routed directory named relative to the repository, wherever the bench is run from."""
    return str(ROOT / model) if not Path(model).exists() and (ROOT / model).exists() else model


def identity(model: str) -> dict:
    """Which weights a row measured: a routed directory's creation time, the hash of its routing
    tensors and the perplexity it recorded when made (for the frontier's points, the frontier's
    figure). ``--resume`` redoes a row whose directory now holds another model."""
    path = Path(resolve(model))
    if not (path / "irc.json").is_file():
        return {}
    import hashlib

    record = json.loads((path / "irc.json").read_text())
    digest = hashlib.sha256((path / "routing.safetensors").read_bytes()).hexdigest()
    return {"created": record.get("created"), "routing_sha256": digest[:16],
            "recorded_perplexity": record.get("evaluation", {}).get("perplexity")}


def dense_perplexity() -> float | None:
    """``bench/frontier.py``'s dense perplexity (first 20,480 held-out tokens, windows of 1024)."""
    path = ROOT / "docs" / "results" / "frontier.json"
    if not path.is_file():
        return None
    return next((r["perplexity"] for r in json.loads(path.read_text())["rows"] if r["method"] == "dense"), None)


def metrics_of(task_results: dict) -> dict:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": e, ...}`` as ``{"acc": {"value": v, "stderr": e}}``
    (stderr None where lm-eval gives "N/A")."""
    values = {k.split(",")[0]: v for k, v in task_results.items() if "," in k}
    out = {}
    for name, value in values.items():
        if name.endswith("_stderr"):
            continue
        stderr = values.get(f"{name}_stderr")
        out[name] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
    return out


def evaluate_task(lm, task: str, limit: int, manager) -> dict:
    import lm_eval

    lm.batch_size = BATCH_SIZE.get(task, 1)
    lm.reset_facts()
    t = time.perf_counter()
    # lm-eval prints notes on stdout; the log keeps them, apart from the bench's own lines
    with contextlib.redirect_stdout(sys.stderr):
        results = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager,
                                          log_samples=False, verbosity="WARNING")
    seconds = time.perf_counter() - t
    facts = lm.facts()
    return {"metrics": metrics_of(results["results"][task]), "n": results["n-samples"][task]["effective"],
            "version": results["versions"][task], "batch_size": lm.batch_size, "max_length": lm.max_length,
            "seconds": round(seconds, 1), **{k: facts.get(k) for k in FACTS}}


def write(out: Path, result: dict) -> None:
    results_path(out, ".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    rows = {(r["model"], r["task"]): r for r in result["rows"]}
    models = list(dict.fromkeys([*result["models"], *(r["model"] for r in result["rows"])]))
    dense_ppl = dense_perplexity()
    dense_wppl = next((r["metrics"]["word_perplexity"]["value"] for r in result["rows"]
                       if r["label"] == "dense" and r["task"] == "irc_wiki_rolling"), None)
    fmt = lambda v, f="{:.2f}": "–" if v is None else f.format(v)  # noqa: E731

    def cell(model, task, metric, f="{:.2f}", stderr=False):
        r = rows.get((model, task))
        m = r and r["metrics"].get(metric)
        if not m:
            return "–"
        return f.format(m["value"]) + (f" ± {f.format(m['stderr'])}" if stderr and m["stderr"] is not None else "")

    def saved(model, task):
        r = rows.get((model, task))
        return "–" if r is None else "0%" if r.get("flops_saved") is None else f"{100 * r['flops_saved']:.1f}%"

    lines = [
        "# Task quality through lm-evaluation-harness (SmolLM2-135M)",
        "",
        "Dense against the frontier's informed points and its strongest baseline (`docs/results/frontier.md`), "
        "through irc's lm-eval backend (`irc lm-eval`), on irc's offline tasks built from the wiki held-out split: "
        "`irc_wiki_rolling` (whole documents in rolling windows of 8192 tokens, the harness's `wikitext` "
        "protocol: word and byte perplexity, bits per byte) and `irc_lastword` (last word of a passage of "
        "40–150 words, the LAMBADA protocol: accuracy of the greedy word and perplexity). "
        + ("Every document of both tasks (n below)" if result["limit"] is None else
           f"At most {result['limit']} documents per task (n below)")
        + ", bf16, zero-shot. Routed models run at the dial they were saved with; FLOPs saved and "
        "unit sparsity are what the backend measured on each task's own forward passes (routers and "
        "forecasters counted, attention at the mean forward length). ± is lm-eval's stderr (it gives none "
        "for the rolling task's corpus-level perplexities). NLL × dense: the ratio of log word perplexities, "
        "which is the ratio of mean token NLLs (every model scores the same tokens and words). Recorded ppl: "
        "the token perplexity the model recorded when made (`irc.json`; for the frontier's points the "
        "frontier's figure: first 20,480 held-out tokens, windows of 1024; dense: the frontier's dense row).",
        "",
        "Commands, in the order they ran: " + "; ".join(f"`{c}`" for c in result["commands"])
        + f". {result['machine']}. "
        + ("Complete." if result["complete"] else "Partial: rows not yet run are missing (`--resume` adds them)."),
        "",
        "| model | preset | FLOPs saved (rolling / last word) | unit sparsity (rolling) | word perplexity "
        "| NLL × dense | bits per byte | last-word acc | last-word perplexity | recorded ppl | time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model in models:
        roll = rows.get((model, "irc_wiki_rolling"))
        wppl = roll and roll["metrics"].get("word_perplexity", {}).get("value")
        seconds = sum(r["seconds"] for (m, _), r in rows.items() if m == model)
        lines.append("| " + " | ".join([
            label(model), (roll or {}).get("preset") or "–",
            f"{saved(model, 'irc_wiki_rolling')} / {saved(model, 'irc_lastword')}",
            fmt(roll and roll.get("achieved_sparsity")), cell(model, "irc_wiki_rolling", "word_perplexity"),
            # the same tokens and words for every model: log word perplexity ∝ the mean token NLL
            f"{math.log(wppl) / math.log(dense_wppl):.3f}×" if wppl and dense_wppl else "–",
            cell(model, "irc_wiki_rolling", "bits_per_byte", "{:.4f}"),
            cell(model, "irc_lastword", "acc", "{:.3f}", stderr=True),
            cell(model, "irc_lastword", "perplexity", "{:.1f}", stderr=True),
            fmt(dense_ppl if roll and roll["kind"] == "base" else roll and roll.get("recorded_perplexity")),
            f"{seconds:.0f} s" if seconds else "–",
        ]) + " |")
    lines += ["", "Every metric lm-eval returned:", "",
              "| model | task | n | metric | | value | ± stderr | seconds |", "|---|---|---:|---|---|---:|---:|---:|"]
    for model in models:
        for task in result["tasks"]:
            r = rows.get((model, task))
            if r is None:
                continue
            for i, (name, m) in enumerate(r["metrics"].items()):
                lines.append("| " + " | ".join([
                    label(model) if i == 0 else "", task if i == 0 else "", str(r["n"]) if i == 0 else "",
                    name, ARROW.get(name, "↓"), f"{m['value']:.4f}", fmt(m["stderr"], "{:.4f}"),
                    f"{r['seconds']:.0f}" if i == 0 else "",
                ]) + " |")
    notes = result.get("notes", [])
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    results_path(out, ".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated: smollm2-135m (dense) and routed directories (default: the 20%% "
                   "frontier points; runs/frontier/informed-folded@0.30,runs/frontier/static-lff@0.30 add 30%%)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=None,
                   help="at most N documents per task (default: all; the rolling task has 10, the last-word 336)")
    p.add_argument("--resume", action="store_true", help="keep rows already in the JSON (measured at this limit)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "tasks"))
    args = p.parse_args()

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from irc.eval.lm_eval import IrcLM
    from irc.eval.lm_eval_tasks import build_tasks

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    threads = torch.get_num_threads()
    command = ("python bench/tasks.py " + " ".join(sys.argv[1:])).strip()
    result = {"models": models, "tasks": tasks, "limit": args.limit, "dtype": "bf16", "rows": [], "notes": [],
              "complete": False, "commands": [command],
              "machine": f"{platform.machine()} CPU, {threads} thread{'s' if threads != 1 else ''}, "
              f"torch {torch.__version__}, lm-eval {lm_eval.__version__}"}
    if args.resume and results_path(out, ".json").is_file():
        previous = json.loads(results_path(out, ".json").read_text())
        if previous.get("limit") == args.limit:
            result["rows"], result["notes"] = previous["rows"], previous.get("notes", [])
            result["commands"] = previous["commands"] + ([command] if command not in previous["commands"] else [])
        else:
            print(f"--resume: {results_path(out, '.json')} was measured at limit {previous.get('limit')}, "
                  f"not {args.limit}: starting afresh", flush=True)
    identities = {m: identity(m) for m in models}
    stale = [r for r in result["rows"] if r["model"] in identities
             and {k: r.get(k) for k in identities[r["model"]]} != identities[r["model"]]]
    for r in stale:
        print(f"--resume: {r['model']} now holds another model ({identities[r['model']]}): "
              f"{r['task']} is measured again", flush=True)
    done = {(r["model"], r["task"]) for r in result["rows"] if r not in stale}
    with tempfile.TemporaryDirectory(prefix="irc-bench-tasks-") as include:
        built = build_tasks(tasks, Path(include))  # sets the offline variables before lm-eval loads datasets
        manager = TaskManager(include_path=[include])
        for model in models:
            todo = [t for t in tasks if (model, t) not in done]
            if not todo:
                continue
            print(f"=== {label(model)} ({model})", flush=True)
            t = time.perf_counter()
            identities[model] = identity(model)  # what is loaded now (a directory may be replaced meanwhile)
            lm = IrcLM(resolve(model), dtype="bf16")
            print(f"    loaded in {time.perf_counter() - t:.1f}s ({lm.kind})", flush=True)
            # the convert's preset (a folded model keeps its source's training record)
            records = lm.model.records if lm.kind == "routed" else {}
            preset = records.get("training", {}).get("config", {}).get("preset")
            for task in todo:
                row = {"model": model, "label": label(model), "task": task, "kind": lm.kind, "preset": preset,
                       **identities[model],
                       "data_file": built.files.get(task), **evaluate_task(lm, task, args.limit, manager)}
                result["rows"] = [r for r in result["rows"] if (r["model"], r["task"]) != (model, task)] + [row]
                write(out, result)
                shown = " ".join(f"{k}={m['value']:.4g}" + (f"±{m['stderr']:.2g}" if m["stderr"] is not None else "")
                                 for k, m in row["metrics"].items())
                routed = "" if row["flops_saved"] is None else (
                    f" flops_saved={row['flops_saved']:.3f} sparsity={row['achieved_sparsity']:.3f}")
                print(f"    {task} n={row['n']}: {shown}{routed} ({row['seconds']:.0f}s)", flush=True)
            del lm
    result["complete"] = {(m, t) for m in models for t in tasks} <= {(r["model"], r["task"]) for r in result["rows"]}
    write(out, result)
    print(f"wrote {results_path(out, '.md')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
