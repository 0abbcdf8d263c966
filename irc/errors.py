"""Errors meant for users.

A ``UserError`` says what was wrong, what was expected and what to do. The CLI
prints it as one line without a traceback and exits non-zero. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, not a bug in irc."""
