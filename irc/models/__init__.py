"""Model loading (Hugging Face directory, GGUF, the embedded default) and architecture facts."""

from irc.models.arch import SUPPORTED_FAMILIES, Architecture
from irc.models.loading import LoadedModel, load_model, load_tokenizer
from irc.models.sources import ALIASES, ModelSource, resolve_source

__all__ = [
    "ALIASES",
    "SUPPORTED_FAMILIES",
    "Architecture",
    "LoadedModel",
    "ModelSource",
    "load_model",
    "load_tokenizer",
    "resolve_source",
]
