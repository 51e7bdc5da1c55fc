"""Where a server command (``serve``, ``deploy``) gets the API key clients must send.

In order: ``--api-key-file PATH`` (the file's first line), ``--api-key KEY``, the
``FIRETITAN_API_KEY`` environment variable, else a random ``tml-...`` key that the
command prints once. A key given on the command line is visible to every local user in
the process list (``ps``), so the documented forms are the file and the environment;
the flag stays for throwaway keys and says so in its help.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

__all__ = ["API_KEY_ENV", "ApiKeyError", "add_api_key_arguments", "api_key_from"]

API_KEY_ENV = "FIRETITAN_API_KEY"


class ApiKeyError(ValueError):
    """The key cannot be read as asked (message names the option and the problem)."""


def add_api_key_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--api-key-file`` and ``--api-key`` to a server command's parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="read the key clients must send from this file (its first line); "
        f"otherwise ${API_KEY_ENV}, else a random tml-... key printed once",
    )
    group.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="the key clients must send. WARNING: every local user sees it in the process "
        f"list; prefer ${API_KEY_ENV} or --api-key-file",
    )


def api_key_from(args: argparse.Namespace) -> tuple[str | None, str]:
    """The key the options and the environment name, and where it came from.

    Returns:
        ``(key, source)``: ``key`` is None when none was given (the caller generates
        one); ``source`` is ``"file"``, ``"flag"``, ``"env"`` or ``"none"``.

    Raises:
        ApiKeyError: The key file cannot be read or holds no key.
    """
    if args.api_key_file is not None:
        return _read_key_file(Path(args.api_key_file)), "file"
    if args.api_key:
        return args.api_key, "flag"
    env = os.environ.get(API_KEY_ENV)
    if env:
        return env, "env"
    return None, "none"


def _read_key_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ApiKeyError(f"--api-key-file {str(path)!r}: cannot be read ({reason})") from None
    lines = text.splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise ApiKeyError(f"--api-key-file {str(path)!r}: the first line holds no key")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            f"WARNING: --api-key-file {str(path)!r} is readable by other users "
            f"(mode {stat.S_IMODE(mode):o}); chmod 600 it",
            file=sys.stderr,
        )
    return key
