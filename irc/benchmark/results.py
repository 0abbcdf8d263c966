"""Where a benchmark writes its figures: ``--out NAME`` → ``NAME.json``, ``NAME.md`` (and a plot)."""

from __future__ import annotations

from pathlib import Path


def results_path(out: str | Path, suffix: str) -> Path:
    """``--out NAME``'s file with ``suffix`` (``".json"``, ``".md"``, ``".png"``): NAME plus the suffix,
    a trailing ``.md`` or ``.json`` on NAME dropped first. Unlike ``Path.with_suffix`` the dots inside
    NAME stay: ``decode_speed_min_saving_0.003`` must not become ``decode_speed_min_saving_0.json``."""
    name = str(out)
    if name.endswith((".md", ".json")):
        name = name.rsplit(".", 1)[0]
    return Path(name + suffix)
