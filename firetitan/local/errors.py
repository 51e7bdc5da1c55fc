"""`UserError`: a mistake in a request, reported to the client with category ``user``.

Its own module so that every checker can raise it without importing another: the rules
(``rules.py``, which re-exports it) and the uploaded-loss checks (``loss_graphs.py``,
which ``rules.py`` names in its types) both do.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in a request, reported to the client with category ``user``."""
