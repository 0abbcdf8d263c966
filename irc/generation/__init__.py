"""Routed generation: a decode-step graph with a KV cache, rewritten by the routing pass, and a loop."""

from irc.generation.generate import GenerationResult, generate, left_pad
from irc.generation.sampling import GenerationConfig

__all__ = ["GenerationConfig", "GenerationResult", "generate", "left_pad"]
