"""``irc lm-eval MODEL --tasks T1,T2``: lm-evaluation-harness tasks through the ``irc`` backend.

A thin layer over ``lm_eval.simple_evaluate``: irc's offline tasks
(``irc_wiki_rolling``, ``irc_lastword``, ``mc:FILE.jsonl``; ``irc.eval.lm_eval_tasks``)
are built into a temporary include directory, every other task passes through to
the user's lm-eval setup. Prints the harness's table (on stderr with ``--json``,
whose stdout is one JSON object), adds the routed model's facts (achieved
sparsity, FLOPs saved) to the results under ``"irc"``, and writes
``--output DIR/results.json`` atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

INSTALL = "pip install 'lm-eval>=0.4.13,<0.5'  (the irc[eval] extra: pip install -e '.[eval]' in a checkout)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lm-eval",
        help="lm-evaluation-harness tasks (needs the irc[eval] extra)",
        description="Evaluate MODEL on lm-evaluation-harness tasks through irc's backend: a routed "
        "directory, a base model (Hugging Face directory, .gguf, smollm2-135m) or an exported .onnx file. "
        "Offline tasks built from irc's corpora: irc_wiki_rolling (word/byte perplexity, the wikitext "
        "protocol), irc_lastword (the LAMBADA protocol), mc:/path/file.jsonl (question/choices/label). "
        "Other task names go to lm-eval as they are.",
    )
    p.add_argument("model", help="routed model directory, Hugging Face directory, .gguf file, .onnx file, "
                   "or smollm2-135m")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="N", help="few-shot examples per task")
    p.add_argument("--limit", type=float, default=None, metavar="N",
                   help="at most N documents per task (a fraction below 1: that share of them)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="requests per forward pass (capacity-routed models always run one)")
    p.add_argument("--output", default=None, metavar="DIR", help="write DIR/results.json")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table on stderr)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"],
                   help="compute precision (default bf16, as irc eval)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="routed models: recalibrate the dial to this unit sparsity first (as irc eval)")
    p.add_argument("--flops-saved", type=float, default=None, metavar="F",
                   help="routed models: recalibrate the dial to save F of the FLOPs per token (as irc eval)")
    p.add_argument("--calib-data", default="wiki:train",
                   help="held-in corpus for --sparsity / --flops-saved (default wiki:train)")
    p.add_argument("--data", default="wiki:heldout",
                   help="corpus of irc_wiki_rolling and irc_lastword (default wiki:heldout)")
    p.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="context length of the scoring windows (default: the model's positions, else 2048)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of the user's own lm-eval task YAMLs (repeatable)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import importlib

    from irc.errors import UserError

    try:
        importlib.import_module("lm_eval")
    except ImportError:
        raise UserError(f"lm-eval is not installed: {INSTALL}") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty; name at least one task (e.g. irc_wiki_rolling,irc_lastword)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    limit = args.limit
    if limit is not None:
        if limit <= 0:
            raise UserError(f"--limit must be positive, got {limit}")
        limit = int(limit) if limit >= 1 else limit
    _check_model(args.model)
    if args.output:
        from irc.cache import check_output

        check_output(f"{args.output}/results.json", flag="--output")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="irc-lm-eval-") as include:
        return _evaluate(args, tasks, limit, include)


def _evaluate(args: argparse.Namespace, tasks: list[str], limit, include: str) -> int:
    from pathlib import Path

    from irc.cli.common import emit_json, info
    from irc.errors import UserError
    from irc.eval.lm_eval_tasks import build_tasks

    start = time.perf_counter()
    built = build_tasks(tasks, Path(include), corpus=args.data)  # sets the offline variables before lm-eval loads
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from irc.eval.lm_eval import IrcLM

    for path in args.include_path:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path} is not a folder")
    manager = TaskManager(include_path=[include, *args.include_path])
    unknown = [t for t in built.names if t not in manager.all_tasks and not manager.match_tasks([t])]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        raise UserError(f"unknown task {unknown[0]!r}" + (f" (did you mean {', '.join(near)}?)" if near else "")
                        + "; irc's offline tasks are irc_wiki_rolling, irc_lastword and mc:/path/file.jsonl, "
                        "other names must be lm-eval tasks (lm-eval ls tasks) or in an --include-path folder")
    lm = IrcLM(args.model, dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length,
               sparsity=args.sparsity, flops_saved=args.flops_saved, calib_data=args.calib_data)
    # lm-eval prints progress notes on stdout; with --json stdout holds the JSON object only
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        results = lm_eval.simple_evaluate(model=lm, tasks=built.names, num_fewshot=args.num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False,
                                          verbosity="WARNING" if args.json else None)
    facts = {**lm.facts(), "model": args.model, "dtype": args.dtype, "batch_size": args.batch_size,
             "max_length": lm.max_length, "own_tasks": {n: built.files[n] for n in built.own},
             "corpus": built.corpus or None, "seconds": round(time.perf_counter() - start, 3)}
    results["irc"] = facts
    table = _table(results)
    if args.output:
        _write_results(Path(args.output) / "results.json", results, handle_non_serializable)
    if args.json:
        print(table, file=sys.stderr)
        emit_json(_jsonable(results, handle_non_serializable))
        return 0
    info(table)
    if facts["kind"] == "routed" and facts["achieved_sparsity"] is not None:
        info(f"routed      {facts['variant']}: sparsity {facts['achieved_sparsity']:.3f} achieved, FLOPs saved "
             f"{100 * facts['flops_saved']:.1f}% (at the mean forward length {facts['flops_seq_len']}), over "
             f"{facts['tokens_routed']:,} tokens")
    if args.output:
        info(f"results     {Path(args.output) / 'results.json'}")
    info(f"PASSED lm-eval {facts['seconds']:.1f}s {_headline(results)} model={args.model}")
    return 0


def _check_model(model: str) -> None:
    """A missing model is reported before lm-eval indexes its tasks (seconds)."""
    from pathlib import Path

    from irc.errors import UserError
    from irc.routing import is_routed_dir

    if is_routed_dir(model):
        return
    if model.endswith(".onnx"):
        if not Path(model).is_file():
            raise UserError(f"no such ONNX file: {model}")
        return
    from irc.models.sources import resolve_source

    resolve_source(model)


def _table(results: dict) -> str:
    """The harness's own table (``lm_eval.utils.make_table``), groups too."""
    from lm_eval.utils import make_table
    from pytablewriter import MarkdownTableWriter

    # pytablewriter < 0.47 (what pip picks where python-dateutil >= 3 is pinned) names the
    # property `header_list`; lm-eval sets `headers`, which that version ignores (columns A, B, ...)
    base = next(c for c in MarkdownTableWriter.__mro__ if c.__name__ == "AbstractTableWriter")
    if "headers" not in dir(base) and "header_list" in dir(base):
        base.headers = property(lambda w: w.header_list, lambda w, v: setattr(w, "header_list", v))
    return make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def _headline(results: dict) -> str:
    """One number per task for the verdict line: accuracy, else word perplexity, else its first metric."""
    parts = []
    for task, metrics in results.get("results", {}).items():
        values = {k.split(",")[0]: v for k, v in metrics.items()
                  if "," in k and "stderr" not in k and isinstance(v, (int, float))}
        name = next((m for m in ("acc", "word_perplexity") if m in values), next(iter(values), None))
        if name is not None:
            parts.append(f"{task}:{name}={values[name]:.4g}")
    facts = results.get("irc", {})
    if facts.get("achieved_sparsity") is not None:
        parts.append(f"sparsity={facts['achieved_sparsity']:.3f} flops_saved={facts['flops_saved']:.3f}")
    return " ".join(parts)


def _jsonable(results: dict, default) -> dict:
    import json

    return json.loads(json.dumps(results, default=default))


def _write_results(path, results: dict, default) -> None:
    import json

    from irc.cache import atomic_file

    with atomic_file(path, "w") as f:
        json.dump(results, f, indent=2, default=default)
        f.write("\n")
