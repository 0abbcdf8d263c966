"""Progress bars on stderr for anything that takes more than a few seconds.

``IRC_PROGRESS=0`` turns them off. When stderr is not a terminal (CI logs) they
update rarely instead of redrawing many times a second.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress(
    iterable=None, *, total=None, desc: str = "", unit: str = "it", leave: bool = False,
    enabled: bool = True,
):
    disabled = not enabled or os.environ.get("IRC_PROGRESS", "1") == "0"
    tty = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit != "it",
        leave=leave,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.2 if tty else 15.0,
        disable=disabled,
    )
