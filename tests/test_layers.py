"""The package's layers import downhill only.

Measurement (``irc.eval``), the runtime pieces (``irc.nn``, ``irc.ops``, ``irc.passes``,
``irc.generation``, ``irc.exporters``, ...) and data never import the training stages
(``irc.train``): training uses them, not the other way round. Evaluation does not reach
into the exporters either (the speed harness that compares backends is ``irc.benchmark``).
Every import in a module counts, at top level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

IRC = Path(__file__).resolve().parents[1] / "irc"

# package -> packages it must not import
FORBIDDEN = {
    "data": ("irc.train", "irc.eval", "irc.exporters", "irc.cli"),
    "eval": ("irc.train", "irc.cli"),
    "nn": ("irc.train", "irc.eval", "irc.cli"),
    "ops": ("irc.train", "irc.eval", "irc.cli"),
    "passes": ("irc.train", "irc.cli"),
    "generation": ("irc.train", "irc.cli"),
    "exporters": ("irc.train", "irc.cli"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _violations(package: str) -> list[str]:
    bad = []
    for path in sorted((IRC / package).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(IRC.parent)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_uphill_imports(package):
    assert _violations(package) == []


def test_the_check_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from irc.train.convert import convert\n    import irc.train\n")
    assert imported_modules(module) == [(2, "irc.train.convert"), (3, "irc.train")]
