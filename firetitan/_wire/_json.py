"""JSON primitives of the codec: `WireError`, `dumps`/`loads`, field validators and
number arrays.

The other modules of `firetitan._wire` build on these private helpers; of this module
only `WireError`, `dumps` and `loads` are public (the package re-exports them).
"""

from __future__ import annotations

import array as stdarray
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

__all__ = [
    "WireError",
    "dumps",
    "loads",
]

JSON = dict[str, Any]

_MAX_TOKEN_ID: Final = 2**31 - 1  # token ids travel as int32 in tinker's protobuf
_INT64_MAX: Final = 2**63 - 1
_V2_MIN_ELEMENTS: Final = 256  # the reference client shortens only tensors this long


class WireError(ValueError):
    """A body that does not follow the protocol.

    Attributes:
        field: Dotted path of the offending value (``""`` for the whole body).
        reason: What is wrong with it.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------- bytes


def dumps(obj: Any) -> bytes:
    """Serialise a JSON-able object (numpy arrays allowed) to UTF-8 bytes.

    Raises:
        WireError: The object holds a non-finite float or a type JSON cannot carry.
    """
    try:
        out = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:  # orjson.JSONEncodeError derives from TypeError
        raise WireError("", f"cannot serialise as JSON: {exc}") from exc
    # orjson writes NaN and infinities as null. A body without any "null" therefore
    # holds only finite numbers; only otherwise is the object walked to tell a
    # non-finite number from a genuine None.
    if _has_null(out):
        bad = _find_non_finite(obj, "")
        if bad is not None:
            raise WireError(bad, "non-finite number (NaN or infinity) cannot be sent as JSON")
    return out


_NULL_SCAN_BYTES: Final = 64 * 1024
_N, _U = ord("n"), ord("u")


def _present(obj: Any, *names: str, **constants: Any) -> JSON:
    """The attributes ``names`` of ``obj``, in order, less those that are None (optional
    fields are omitted, as the reference client omits them), then ``constants``.
    Mappings are copied into plain dicts and sequences into lists."""
    body: JSON = {}
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, Mapping):
            body[name] = dict(value)
        elif isinstance(value, list | tuple):
            body[name] = list(value)
        elif value is not None:
            body[name] = value
    body.update(constants)
    return body


def _has_null(out: bytes) -> bool:
    """Whether ``out`` contains ``null``.

    For large bodies, numpy finds the candidate positions (an ``n`` followed by a
    ``u``) several times faster than ``bytes.__contains__`` scans for the word.
    """
    if len(out) < _NULL_SCAN_BYTES:
        return b"null" in out
    raw = np.frombuffer(out, dtype=np.uint8)
    candidates = np.flatnonzero((raw[:-3] == _N) & (raw[1:-2] == _U))
    return any(out.startswith(b"null", int(i)) for i in candidates)


def loads(data: bytes | str) -> Any:
    """Parse a JSON body.

    Raises:
        WireError: The body is not valid JSON (field ``""``).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise WireError("", f"malformed JSON: {exc}") from exc


def _find_non_finite(obj: Any, path: str) -> str | None:
    """Path of the first NaN/infinity in ``obj``, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else path
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _find_non_finite(value, _key(path, str(key)))
            if found is not None:
                return found
        return None
    if isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            found = _find_non_finite(value, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fc":
            bad = np.flatnonzero(~np.isfinite(obj.reshape(-1)))
            if bad.size:
                return f"{path}[{int(bad[0])}]"
        return None
    if isinstance(obj, np.floating):
        return None if bool(np.isfinite(obj)) else path
    return None


# --------------------------------------------------------------------------- field helpers


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _obj(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(field, f"expected a JSON object, got {_type_name(value)}")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(field, f"expected an array, got {_type_name(value)}")
    return value


def _required(obj: Mapping[str, Any], key: str, path: str) -> Any:
    value = obj.get(key)
    if value is None:
        raise WireError(_key(path, key), "required field is missing")
    return value


def _str(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise WireError(field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value:
        raise WireError(field, "must not be empty")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    return None if value is None else _str(value, _key(path, key))


def _int(value: Any, field: str, *, lo: int | None = None, hi: int = _INT64_MAX) -> int:
    # bool is an int subclass in Python; JSON true is never an integer here.
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(field, f"expected an integer, got {_type_name(value)}")
    if lo is not None and value < lo:
        raise WireError(field, f"must be >= {lo}, got {value}")
    if value > hi:
        raise WireError(field, f"must be <= {hi}, got {value}")
    return value


def _opt_int(
    obj: Mapping[str, Any], key: str, path: str, *, lo: int | None = None, hi: int = _INT64_MAX
) -> int | None:
    value = obj.get(key)
    return None if value is None else _int(value, _key(path, key), lo=lo, hi=hi)


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(field, f"expected a boolean, got {_type_name(value)}")
    return value


def _opt_bool(obj: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = obj.get(key)
    return default if value is None else _bool(value, _key(path, key))


def _float(
    value: Any,
    field: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise WireError(field, f"expected a number, got {_type_name(value)}")
    try:
        number = float(value)
    except OverflowError as exc:
        raise WireError(field, "number out of range") from exc
    if not math.isfinite(number):
        raise WireError(field, "must be a finite number")
    if lo is not None and (number < lo or (lo_open and number == lo)):
        raise WireError(field, f"must be {'>' if lo_open else '>='} {lo}, got {number}")
    if hi is not None and (number > hi or (hi_open and number == hi)):
        raise WireError(field, f"must be {'<' if hi_open else '<='} {hi}, got {number}")
    return number


def _str_dict(value: Any, field: str) -> dict[str, str]:
    obj = _obj(value, field)
    for key, item in obj.items():
        _str(item, _key(field, key), allow_empty=True)
    return dict(obj)


def _check_type(obj: Mapping[str, Any], expected: str, path: str) -> None:
    """A ``"type"`` discriminator, where present, must name the expected body."""
    value = obj.get("type")
    if value is not None and value != expected:
        raise WireError(_key(path, "type"), f"expected {expected!r}, got {value!r}")


def _metric_value(value: Any, field: str) -> float:
    if isinstance(value, np.generic):
        value = value.item()
    return _float(value, field)


# --------------------------------------------------------------------------- numbers


def _narrow_to_float32(wide: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """Round parsed float64 values to float32, as a direct decimal-to-float32 parse would.

    The JSON parser rounds each decimal to the nearest float64; rounding that again to
    float32 (ties to even) usually equals rounding the decimal straight to float32.
    It differs only when the float64 lands exactly on the midpoint between two
    neighbouring float32 values while the decimal itself was not on it: the tie then
    breaks to even instead of towards the side the decimal was on. Shortest float32
    decimals (v2, §6.4) do hit this: ``7.038531e-26`` is the shortest decimal of the
    float32 ``0x15ae43fd``, lies just below a midpoint, parses to the midpoint exactly,
    and would narrow to ``0x15ae43fe``. An exhaustive check of every finite float32
    (shortest decimal as orjson writes it, parsed by orjson) finds this value and its
    negative as the only ones; with the correction below all of them decode exactly.

    Values that are exact float32s (v1) never sit on a midpoint. For a value that does,
    the decimal was the shortest decimal of one of the two neighbours, so the neighbour
    whose shortest decimal parses to this very float64 is taken. If neither does (the
    sender wrote some other decimal), the float64 was an exact tie and either neighbour
    is correctly rounded; ties-to-even is kept. Only midpoint values take the slow path.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        narrow = wide.astype(np.float32)  # out-of-range values become inf, refused by callers
        mismatch = narrow.astype(np.float64) != wide
    # any() first: a reduction costs far less than flatnonzero when all are exact (v1).
    if not mismatch.any():
        return narrow
    inexact = np.flatnonzero(mismatch)
    values = wide[inexact]
    nearest = narrow[inexact]
    toward = np.where(values > nearest.astype(np.float64), np.float32(np.inf), np.float32(-np.inf))
    with np.errstate(over="ignore", invalid="ignore"):
        neighbour = np.nextafter(nearest, toward)
        midpoint = (nearest.astype(np.float64) + neighbour.astype(np.float64)) * 0.5
    on_midpoint = np.flatnonzero((midpoint == values) & np.isfinite(neighbour))
    if on_midpoint.size == 0:
        return narrow
    tied = values[on_midpoint]
    kept = nearest[on_midpoint]
    other = neighbour[on_midpoint]
    kept_text = np.asarray(orjson.loads(dumps(kept)), dtype=np.float64)
    other_text = np.asarray(orjson.loads(dumps(other)), dtype=np.float64)
    switch = (other_text == tied) & (kept_text != tied)
    narrow[inexact[on_midpoint[switch]]] = other[switch]
    return narrow


def _first_bad_index(values: list[Any], allowed: tuple[type, ...]) -> int:
    # Only called once a check has failed, to name the element.
    for i, item in enumerate(values):
        if type(item) not in allowed:
            return i
    return 0


def _int_array(values: Any, field: str, *, what: str = "integers") -> npt.NDArray[np.int64]:
    items = _list(values, field)
    kinds = set(map(type, items))
    if not kinds <= {int}:
        i = _first_bad_index(items, (int,))
        raise WireError(f"{field}[{i}]", f"expected {what}, got {_type_name(items[i])}")
    try:
        return np.array(items, dtype=np.int64)
    except OverflowError as exc:
        raise WireError(field, "integer out of the int64 range") from exc


def _exact_float32(items: list[Any]) -> npt.NDArray[np.float32] | None:
    """``items`` as float32 if every one is exactly a finite float32 value, else None.

    The common case for small tensors (v1 writes every float32 exactly; v2 shortens
    only long tensors). It uses C-level builtins rather than the dozen numpy calls of
    the general path, each of which costs microseconds when a request's handling has
    evicted numpy from the CPU caches. Exact values need no double-rounding repair.
    """
    try:
        single = stdarray.array("f", items)  # rounds to float32; out of range gives inf
    except OverflowError:  # an int beyond the float range
        return None
    # Equal means nothing was rounded (inf passes, NaN fails); sum() is then finite
    # exactly when every value is, since float32-range values cannot overflow a double
    # sum of this length.
    if single.tolist() != items or not math.isfinite(sum(items)):
        return None
    return np.array(single, dtype=np.float32)


def _float32_array(values: Any, field: str) -> npt.NDArray[np.float32]:
    items = _list(values, field)
    kinds = set(map(type, items))
    if not kinds <= {int, float}:
        i = _first_bad_index(items, (int, float))
        raise WireError(f"{field}[{i}]", f"expected numbers, got {_type_name(items[i])}")
    if len(items) < _V2_MIN_ELEMENTS:
        exact = _exact_float32(items)
        if exact is not None:
            return exact
    try:
        wide = np.array(items, dtype=np.float64)
    except OverflowError as exc:
        raise WireError(field, "number out of the float32 range") from exc
    narrow = _narrow_to_float32(wide)
    finite = np.isfinite(narrow)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        reason = "number out of the float32 range" if np.isfinite(wide[i]) else "non-finite"
        raise WireError(f"{field}[{i}]", reason)
    return narrow


def _token_ids(values: Any, field: str) -> list[int]:
    array = _int_array(values, field, what="integer token ids")
    if array.size:
        bad = np.flatnonzero((array < 0) | (array > _MAX_TOKEN_ID))
        if bad.size:
            i = int(bad[0])
            raise WireError(f"{field}[{i}]", f"token id {int(array[i])} is out of range")
    items: list[int] = values  # validated: a list of in-range Python ints
    return items
