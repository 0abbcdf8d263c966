"""Loading a decoder LM and its tokenizer from any supported source.

A GGUF file is dequantised once (13–18 s for SmolLM2) and cached as a Hugging
Face directory of safetensors under the irc cache, keyed by the GGUF's sha256;
later loads take under a second. The cache entry is built in a temporary
directory and renamed into place, so a killed or concurrent run never leaves a
broken one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from irc.cache import atomic_dir, cache_dir, cached_sha256, sweep_stale
from irc.dtypes import dtype_name, parse_dtype
from irc.errors import UserError
from irc.models.arch import Architecture
from irc.models.sources import ModelSource, resolve_source

# Nothing may be fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("irc.models")

GGUF_CACHE_VERSION = 1
_MARKER = "irc-source.json"


@dataclass
class LoadedModel:
    """A model ready to run, with where it came from."""

    model: torch.nn.Module
    tokenizer: object
    arch: Architecture
    source: ModelSource
    directory: Path  # the Hugging Face directory the weights were read from
    dtype: torch.dtype
    load_seconds: float
    _weights_sha256: str | None = field(default=None, repr=False)

    @property
    def weights_sha256(self) -> str:
        """sha256 of the source weights (the GGUF file, or the directory's weight files)."""
        if self._weights_sha256 is None:
            self._weights_sha256 = source_weights_sha256(self.source)
        return self._weights_sha256

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> str:
        return (
            f"{self.source.display_name} ({self.arch.family}, {self.arch.n_layers} layers, "
            f"hidden {self.arch.hidden}, {self.n_params / 1e6:.1f}M params) {dtype_name(self.dtype)}"
        )


def load_model(source: str | Path, dtype: str | torch.dtype = "bf16") -> LoadedModel:
    """Load a decoder LM and its tokenizer for evaluation or rewriting.

    ``source`` is a Hugging Face directory, a ``.gguf`` file, or an alias such as
    ``smollm2-135m``. Raises ``UserError`` for a missing path, a hub id, or an
    unsupported architecture.
    """
    torch_dtype = parse_dtype(dtype)
    start = time.perf_counter()
    resolved = resolve_source(source)
    directory = hf_directory(resolved)
    arch = _check_architecture(directory)
    check_weight_files(directory)
    _quiet_transformers()
    from transformers import AutoModelForCausalLM

    try:
        # irc never runs code shipped with a model (auto_map); the config check above refused such a model
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the weights in {directory}: {_first_line(e)}") from None
    model.eval()
    tokenizer = load_tokenizer_from_dir(directory)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        source=resolved,
        directory=directory,
        dtype=torch_dtype,
        load_seconds=time.perf_counter() - start,
        # only irc's own cache entries carry a marker irc wrote; anywhere else the weights are hashed
        _weights_sha256=_cached_marker_sha(directory) if resolved.kind == "gguf" else None,
    )


def load_tokenizer(source: str | Path):
    """The tokenizer of a model source, without loading the weights."""
    return load_tokenizer_from_dir(hf_directory(resolve_source(source)))


def load_tokenizer_from_dir(directory: Path):
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {directory}: {_first_line(e)}") from None


def hf_directory(source: ModelSource) -> Path:
    """The Hugging Face directory holding the source's weights (dequantising a GGUF once)."""
    if source.kind == "hf":
        return source.path
    return _dequantised_gguf(source)


def source_weights_sha256(source: ModelSource) -> str:
    if source.kind == "gguf":
        return cached_sha256([source.path])
    return cached_sha256(weight_files(source.path))


def weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(
            f"{directory} holds no weights: model.safetensors (or any *.safetensors, pytorch_model*.bin) is "
            "missing; expected a Hugging Face model directory"
        )
    return files


def check_weight_files(directory: Path) -> list[Path]:
    """The weight files of ``directory``, each checked to be a whole safetensors file (a missing,
    empty or truncated one is a ``UserError`` naming it)."""
    from safetensors import safe_open

    files = weight_files(directory)
    for path in files:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(path, framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            size = path.stat().st_size
            raise UserError(f"{path} is {'empty' if size == 0 else 'truncated or not a safetensors file'} "
                            f"({size:,} bytes: {_first_line(e)}); copy the model again") from None
    return files


def _check_architecture(directory: Path) -> Architecture:
    _quiet_transformers()
    from transformers import AutoConfig

    config_path = Path(directory) / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.json; expected a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{config_path} is not readable JSON ({_first_line(e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_path} is not a model config (a JSON object)")
    if "auto_map" in raw:
        raise UserError(f"{config_path} asks to run code shipped with the model (auto_map); irc does not run "
                        "code shipped with a model: use a model whose architecture transformers provides")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the model config in {directory}: {_first_line(e)}") from None
    return Architecture.from_config(config)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _dequantised_gguf(source: ModelSource) -> Path:
    sha = cached_sha256([source.path])
    sweep_stale(cache_dir("models"))  # what killed runs left behind
    final = cache_dir("models") / f"{source.path.stem}-{sha[:16]}-v{GGUF_CACHE_VERSION}"
    if (final / _MARKER).is_file():
        return final
    _check_gguf_architecture(source.path)
    print(
        f"irc: dequantising {source.path.name} once into {final} (about 15 s)",
        file=sys.stderr,
    )
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(final) as tmp:
        kwargs = {"gguf_file": source.path.name, "trust_remote_code": False}
        model = AutoModelForCausalLM.from_pretrained(source.path.parent, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.path.parent, **kwargs)
        # save_pretrained refuses a model that still carries its GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "gguf": str(source.path),
            "gguf_sha256": sha,
            "weights_sha256": sha,
            "irc_cache_version": GGUF_CACHE_VERSION,
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return final


def _cached_marker_sha(directory: Path) -> str | None:
    marker = directory / _MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("weights_sha256")
        except (OSError, ValueError, AttributeError):
            return None  # hashed from the weights instead
    return None


def _check_gguf_architecture(path: Path) -> None:
    """Refuse an unsupported GGUF before spending time dequantising it."""
    try:
        from gguf import GGUFReader

        field_ = GGUFReader(path).fields.get("general.architecture")
        arch = bytes(field_.parts[field_.data[0]]).decode() if field_ is not None else None
    except Exception as e:  # a corrupt or foreign file
        raise UserError(f"{path} is not a readable GGUF file: {e}") from None
    from irc.models.arch import SUPPORTED_FAMILIES

    if arch not in SUPPORTED_FAMILIES:
        raise UserError(
            f"{path.name}: unsupported GGUF architecture {arch!r}; irc supports: "
            + ", ".join(SUPPORTED_FAMILIES)
        )


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
