"""Run an explicit list of passes: each logged, optionally dumped, failures named.

A failure says which pass failed and which ran before it; ``dump_dir`` writes
the graph's code after every pass (``00-capture.py``, ``01-drop_noop_conversions.py``,
...) for review.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from torch.fx import GraphModule

from irc.errors import UserError
from irc.passes.result import PassResult

log = logging.getLogger("irc.passes")

Pass = tuple[str, Callable[[GraphModule], PassResult]]


class PassError(RuntimeError):
    pass


def run_passes(gm: GraphModule, passes: list[Pass], dump_dir: str | Path | None = None) -> list[dict]:
    done: list[str] = []
    report: list[dict] = []
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / "00-capture.py").write_text(gm.code)
    for i, (name, fn) in enumerate(passes, 1):
        start = time.perf_counter()
        after = f" (after {', '.join(done)})" if done else " (the first pass)"
        try:
            result = fn(gm)
        except UserError as e:
            raise UserError(f"pass {name}{after}: {e}") from None
        except Exception as e:
            raise PassError(f"pass {name} failed{after}: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start
        log.info("pass %s: modified=%s %.2fs %s", name, result.modified, seconds, result.stats)
        report.append({"pass": name, "modified": result.modified, "seconds": round(seconds, 3),
                       **{k: v for k, v in result.stats.items() if k != "routed"}})
        if dump_dir:
            (Path(dump_dir) / f"{i:02d}-{name}.py").write_text(gm.code)
        done.append(name)
    return report
