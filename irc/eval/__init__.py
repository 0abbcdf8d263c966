"""Evaluation: perplexity (and, with routing, sparsity and FLOPs)."""

from irc.eval.perplexity import PerplexityResult, evaluate_perplexity, logits_of

__all__ = ["PerplexityResult", "evaluate_perplexity", "logits_of"]
