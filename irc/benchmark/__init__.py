"""Benchmark harnesses: dense vs routed speed and memory across backends.

They sit above everything they measure (``irc.eval``, ``irc.exporters``,
``irc.backends``); nothing below imports them.
"""
