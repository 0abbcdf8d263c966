"""Corpora: the built-in wiki corpus, user text, token streams and evaluation windows."""

from irc.data.corpus import Corpus, load_corpus
from irc.data.tokens import BOS_POLICIES, Window, perplexity_windows, token_stream

__all__ = ["BOS_POLICIES", "Corpus", "Window", "load_corpus", "perplexity_windows", "token_stream"]
