"""Observing every routed unit's (x, a, U(a)) in a dense forward pass (teacher forcing)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable


@contextlib.contextmanager
def observing(routed, units: Iterable, fn: Callable):
    """Put ``routed`` in dense mode and call ``fn(unit, x, a, u, attention_mask)`` for ``units``."""
    units = list(units)
    routed.set_routing("dense")
    for u in units:
        u.observer = fn
    try:
        yield
    finally:
        for u in units:
            u.observer = None
