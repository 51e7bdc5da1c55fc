"""Logging options shared by the commands that run a server (``serve``, ``deploy``).

``--log-level`` sets what the ``firetitan`` loggers print to stderr; ``--access-log``
adds one line per HTTP request (`firetitan.local.access_log`). Kept free of aiohttp and
torch imports so that ``firetitan --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging

__all__ = ["ACCESS_LOGGER", "LOG_LEVELS", "add_logging_arguments", "configure_logging"]

#: The logger the servers' access lines go to (one INFO line per request).
ACCESS_LOGGER = "firetitan.access"
LOG_LEVELS = ("debug", "info", "warning", "error")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` and ``--access-log`` to a server command's parser."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="what the trainer logs to stderr; debug adds every engine step (default: %(default)s)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per HTTP request: method, path, status, duration and the "
        "model, seq and request ids it concerns",
    )


def configure_logging(level: str, access_log: bool) -> None:
    """Send firetitan's log records to stderr at ``level``; access lines only when
    ``access_log`` is set (whatever ``level`` is).

    Raises:
        ValueError: ``level`` is not one of `LOG_LEVELS`.
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger("firetitan")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The firetitan tree prints through its own handler only, not twice via the root.
    root.propagate = False
    # Access lines are INFO: a logger with its own level emits them even when the tree
    # is at warning, and never when the option is off, even at debug.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log else logging.WARNING)
