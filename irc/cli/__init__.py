"""The ``irc`` command line: a thin layer over the API.

Each subcommand is one module with ``add_parser(subparsers)`` and ``run(args)``.
A ``UserError`` prints as one line (``error: ...``) without a traceback and
exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys

from irc import __version__
from irc.errors import UserError

# name → module under irc.cli (imported lazily: `irc --help` stays fast)
SUBCOMMANDS: dict[str, str] = {
    "convert": "convert",
    "eval": "eval",
    "data": "data",
    "inspect": "inspect",
    "fold": "fold",
    "export": "export",
    "generate": "generate",
    "run": "run",
    "bench": "bench",
    "lm-eval": "lm_eval",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irc",
        description="irc — the informed routing compiler: turn a dense decoder LLM into a "
        "token-routed one, then train, evaluate and deploy it.",
    )
    parser.add_argument("--version", action="version", version=f"irc {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        module = importlib.import_module(f"irc.cli.{module_name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher re-runs (``convert --nproc``)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    previous = _sigterm_as_interrupt()
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # on a line of its own: a progress bar may have been drawing on the current one
        print("\ninterrupted" + _RESUME_HINT.get(args.command, ""), file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_RESUME_HINT = {"convert": " (the stage checkpoints are kept: run the same command with --resume to continue)"}


_MAIN_PID = os.getpid()


def _interrupt(signum, frame):
    if os.getpid() != _MAIN_PID:
        # a forked worker inherited the handler (lm-eval's bootstrap pool, terminated with SIGTERM):
        # it ends as SIGTERM asks, without a KeyboardInterrupt traceback of its own
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """SIGTERM (``kill``, a scheduler's stop) unwinds like Ctrl-C: temporary files are removed,
    checkpoints kept. Only the main thread may set a handler."""
    with contextlib.suppress(ValueError):
        return signal.signal(signal.SIGTERM, _interrupt)
    return None
