"""irc — the informed routing compiler.

Turns a dense Hugging Face decoder LLM into an informed-routing model (per token,
each attention and MLP unit either runs or is approximated by a small forecaster),
then trains, evaluates and deploys it.

Heavy modules (torch, transformers) load lazily: ``import irc`` is cheap, and
``irc.load_model`` / ``irc.evaluate_perplexity`` import what they need on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "RoutingPlan", "UserError", "__version__", "evaluate_perplexity", "load", "load_corpus",
    "load_model", "route",
]

from irc.errors import UserError


def __getattr__(name: str):
    if name == "load_model":
        from irc.models import load_model

        return load_model
    if name == "evaluate_perplexity":
        from irc.eval import evaluate_perplexity

        return evaluate_perplexity
    if name in ("route", "load"):
        import irc.routing

        return getattr(irc.routing, name)
    if name == "RoutingPlan":
        from irc.plan import RoutingPlan

        return RoutingPlan
    if name == "load_corpus":
        from irc.data import load_corpus

        return load_corpus
    raise AttributeError(f"module 'irc' has no attribute {name!r}")
