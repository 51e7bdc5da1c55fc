"""Argument checks shared by the clients, with messages that name the argument.

They take ``object`` on purpose: callers without a type checker pass anything, and the
clients must refuse it with a clear error before anything is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["non_empty_str", "positive_int", "positive_number", "string_map"]


def positive_int(value: object, name: str, *, zero: bool = False) -> int:
    """Return ``value`` if it is an int above 0 (or at least 0 with ``zero``).

    Raises:
        ValueError: It is not.
    """
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a non-negative" if zero else "a positive"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")
    return value


def positive_number(value: object, name: str) -> float:
    """Return ``value`` as a float if it is a number above 0 (infinity allowed).

    Raises:
        ValueError: It is not.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def non_empty_str(value: object, name: str) -> str:
    """Return ``value`` if it is a string that is not blank.

    Raises:
        ValueError: It is not.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def string_map(value: object, name: str) -> dict[str, str]:
    """Return a copy of ``value`` if it maps strings to strings (None gives ``{}``).

    Raises:
        TypeError: It does not.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of strings to strings")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError(f"{name} must map strings to strings; {key!r}: {item!r} does not")
        out[key] = item
    return out


def one_of(value: object, choices: Sequence[str], name: str) -> str:
    """``value``, a string, lower-cased and stripped, if it is one of ``choices``.

    Raises:
        ValueError: It is not (a string that is) one of them.
    """
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
