"""`UserError`: a mistake in a request (the trainer reports it with category ``user``).

Its own module, so that the modules the rules use (the custom-loss graphs) can raise it
without importing the rules.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in a request, reported to the client with category ``user``."""
