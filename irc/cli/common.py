"""Helpers shared by subcommands: output, JSON, verdict lines."""

from __future__ import annotations

import json
import sys


def emit_json(obj: dict) -> None:
    json.dump(obj, sys.stdout, sort_keys=False)
    sys.stdout.write("\n")


def info(line: str = "") -> None:
    """Human-readable report lines go to stdout (progress bars go to stderr)."""
    print(line, flush=True)


def fmt_int(n: int) -> str:
    return f"{n:,}"
