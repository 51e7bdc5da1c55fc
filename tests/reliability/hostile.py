"""Hostile input for the fuzz tests: a raw HTTP client, valid request templates, and
hypothesis strategies that turn a template into a body that must be refused.

A *case* is drawn without knowing the trainer's ids; it is applied to a template filled
with the live session, model and ``seq_id`` when it runs, so hypothesis can replay and
shrink it. Two families:

* **Field cases** replace (or remove) one validated field of a valid body with a value
  that breaks its rule: a wrong JSON type, a number out of range, a huge integer, an
  unknown id or enum value, an unsafe checkpoint name, odd unicode, a tensor whose shape
  does not fit its data, nesting where a scalar belongs. The trainer must refuse the
  body with a 4xx JSON error naming the field, or accept it and fail its future with a
  ``user`` error; it must never run it successfully.
* **Structural cases** break the body as a whole: not JSON, invalid UTF-8, lone
  surrogates, NaN/Infinity literals, numbers beyond double range, nesting past the
  parser's limit, a byte-order mark, a non-object, a body past the size limit, a body
  labelled protobuf or compressed that is neither. The answer must be a 4xx JSON error.

Every case is invalid by construction: the fuzz tests fail on any success, and that is
what keeps the model's state unchanged.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from shared import BASE_MODEL

from firetitan._checkpoint_paths import MAX_NAME_LENGTH, parse_checkpoint_path

from .conftest import Scale

INT64_MAX = 2**63 - 1

# --------------------------------------------------------------------------- raw client


@attrs.frozen
class Answer:
    status: int
    content_type: str
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class RawClient:
    """One keep-alive HTTP/1.1 connection to a trainer; every byte is the test's."""

    def __init__(self, base_url: str, api_key: str) -> None:
        url = urllib.parse.urlsplit(base_url)
        assert url.hostname is not None and url.port is not None
        self.host, self.port = url.hostname, url.port
        self.api_key = api_key
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def close(self) -> None:
        self.conn.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        key: bool = True,
    ) -> Answer:
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        if key:
            all_headers["X-API-Key"] = self.api_key
        all_headers.update(headers or {})
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body, headers=all_headers)
                response = self.conn.getresponse()
                raw = response.read()
                if response.will_close:
                    self.conn.close()
                return Answer(response.status, response.getheader("Content-Type", ""), raw)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server may drop a keep-alive connection (after refusing an
                # oversize body, say): reconnect once.
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post(self, endpoint: str, obj: Any) -> Answer:
        return self.request("POST", f"/api/v1/{endpoint}", json.dumps(obj).encode())

    def submit(self, endpoint: str, obj: Any) -> str:
        answer = self.post(endpoint, obj)
        assert answer.status == 200, (endpoint, answer)
        request_id = answer.json["request_id"]
        assert isinstance(request_id, str)
        return request_id

    def outcome(self, request_id: str, within: float = 60.0) -> dict[str, Any]:
        """Poll until the request is no longer pending."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            answer = self.post("retrieve_future", {"request_id": request_id})
            assert answer.status == 200, answer
            body = answer.json
            if body.get("type") != "try_again":
                assert isinstance(body, dict)
                return body
        raise AssertionError(f"{request_id} still pending after {within} s")

    def result(self, request_id: str) -> dict[str, Any]:
        body = self.outcome(request_id)
        assert "error" not in body, body
        return body

    def healthy(self) -> bool:
        return self.request("GET", "/api/v1/healthz").status == 200


# --------------------------------------------------------------------------- templates


def datum(tokens: list[int]) -> dict[str, Any]:
    """A valid datum in v1 JSON: next-token targets, unit weights."""
    n = len(tokens) - 1
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": tokens[1:], "dtype": "int64", "shape": [n]},
            "weights": {"data": [1.0] * n, "dtype": "float32", "shape": [n]},
        },
    }


ADAM_PARAMS = {
    "learning_rate": 1e-3,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-12,
    "weight_decay": 0.0,
    "grad_clip_norm": 0.0,
}


@attrs.define
class Ids:
    """The live ids a template is filled with."""

    session_id: str
    model_id: str
    seq_id: int
    request_id: str


def template(endpoint: str, ids: Ids) -> dict[str, Any]:
    """A valid body for ``endpoint``, as the firetitan client sends it."""
    sid, mid, seq = ids.session_id, ids.model_id, ids.seq_id
    forward_input = {"data": [datum([5, 6, 7, 8, 9])], "loss_fn": "cross_entropy"}
    bodies: dict[str, dict[str, Any]] = {
        "client/config": {"sdk_version": "0.23.0"},
        "client/dynamic_config": {},
        "telemetry": {"events": [], "platform": "linux", "sdk_version": "0.23.0"},
        "create_session": {
            "tags": ["fuzz"],
            "user_metadata": {"k": "v"},
            "sdk_version": "0.23.0",
            "type": "create_session",
        },
        "session_heartbeat": {"session_id": sid, "type": "session_heartbeat"},
        "create_model": {
            "session_id": sid,
            "model_seq_id": 900,
            "base_model": BASE_MODEL,
            "lora_config": {
                "rank": 0,
                "train_mlp": True,
                "train_attn": True,
                "train_unembed": True,
            },
            "type": "create_model",
        },
        "get_info": {"model_id": mid, "type": "get_info"},
        "forward": {"model_id": mid, "seq_id": seq, "forward_input": forward_input},
        "forward_backward": {
            "model_id": mid,
            "seq_id": seq,
            "forward_backward_input": forward_input,
        },
        "optim_step": {
            "model_id": mid,
            "seq_id": seq,
            "adam_params": dict(ADAM_PARAMS),
            "grad_accumulation_normalization": "num_loss_tokens",
            "type": "optim_step",
        },
        "save_weights": {
            "model_id": mid,
            "seq_id": seq,
            "path": "fuzz-save",
            "ttl_seconds": 60,
            "type": "save_weights",
        },
        "load_weights": {
            "model_id": mid,
            "seq_id": seq,
            "path": "fuzz-load",
            "optimizer": True,
            "type": "load_weights",
        },
        "save_weights_for_sampler": {
            "model_id": mid,
            "seq_id": seq,
            "path": "fuzz-export",
            "checkpoint_type": "base",
            "ttl_seconds": 60,
            "type": "save_weights_for_sampler",
        },
        "unload_model": {"model_id": mid, "type": "unload_model"},
        "retrieve_future": {"request_id": ids.request_id, "allow_metadata_only": True},
        "create_sampling_session": {
            "session_id": sid,
            "sampling_session_seq_id": 900,
            "base_model": BASE_MODEL,
            "type": "create_sampling_session",
        },
        "asample": {
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
            "num_samples": 1,
            "sampling_params": {
                "max_tokens": 2,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": -1,
                "seed": 1,
            },
            "base_model": BASE_MODEL,
            "type": "sample",
        },
    }
    return bodies[endpoint]


def fuzz_settings(count: int, scale: Scale) -> Any:
    """Hypothesis settings for ``count`` cases, repeatable in the short scale."""
    return settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=scale.name == "short",
        suppress_health_check=list(HealthCheck),
    )


#: Endpoints whose valid body is queued in the model's seq_id order.
ORDERED = frozenset(
    {
        "forward",
        "forward_backward",
        "optim_step",
        "save_weights",
        "load_weights",
        "save_weights_for_sampler",
    }
)

# --------------------------------------------------------------------------- values

_SCALARS: list[Any] = [True, False, 0, 1, -1, 1.5, -0.0, "", "x", [], {}, [1], {"a": 1}]


def _not(*allowed: type) -> st.SearchStrategy[Any]:
    """JSON values of any type but ``allowed`` (null excluded: it reads as absent)."""

    def fits(value: Any) -> bool:
        if isinstance(value, bool):
            return bool in allowed
        return isinstance(value, allowed)

    nested = st.recursive(
        st.sampled_from(_SCALARS)
        | st.text(max_size=8)
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=6,
    )
    return (nested | deep_nesting()).filter(lambda v: not fits(v))


def deep_nesting() -> st.SearchStrategy[Any]:
    """Lists and objects nested deep, but within the JSON parser's depth limit."""

    def build(depth: int, as_list: bool) -> Any:
        value: Any = 0
        for _ in range(depth):
            value = [value] if as_list else {"a": value}
        return value

    # 500 levels: past anything a real body has, within json.dumps' recursion limit.
    return st.builds(build, st.integers(50, 500), st.booleans())


def odd_text() -> st.SearchStrategy[str]:
    """Unicode that trips naive handling: controls, bidi overrides, zero-width and
    combining characters, fullwidth and lookalike separators, astral planes, and long."""
    specials = [
        "\x00",
        "\n",
        "\r\n",
        "\t",
        "\u202e",
        "\u200b",
        "\ufeff",
        "\u0301",
        "\uff0f",
        "\u2215",
        "\u2024\u2024",
        "\U0001f600",
        "\U000e0041",
        "𝓊𝓃𝒾𝒸ℴ𝒹ℯ",
        "ﷺ",
        "İ",
        "ß",
    ]
    return st.one_of(
        st.builds("".join, st.lists(st.sampled_from(specials) | st.text(max_size=3), min_size=1)),
        st.text(min_size=1, max_size=64),
        st.integers(1000, 20_000).map(lambda n: "é" * n),
    )


def unknown_ids() -> st.SearchStrategy[str]:
    """Strings that are no id the trainer issued."""
    return odd_text().map(lambda t: f"nope-{t}")


def ints_outside(lo: int | None, hi: int = INT64_MAX) -> st.SearchStrategy[int]:
    options = [st.integers(hi + 1, hi + 2**70), st.just(2**200)]
    if lo is not None:
        options.append(st.integers(lo - 2**70, lo - 1))
    return st.one_of(options)


def unsafe_names() -> st.SearchStrategy[str]:
    """Checkpoint names that must never reach the file system."""
    fixed = [
        "..",
        ".",
        "../x",
        "a/../../b",
        "/etc/passwd",
        "/",
        "C:\\x",
        "a\\b",
        "a/b",
        "x\x00y",
        "\x00",
        ".hidden",
        "-dash",
        "a" * (MAX_NAME_LENGTH + 1),
        "%2e%2e",
        "..%2fx",
        "~root",
        "$HOME",
        "a:b",
        "cross_job://../x/y",
        "cross_job://job/../y",
        "cross_job:///abs",
        "cross_job://job/a/b",
        "cross_job://job/",
        "cross_job://",
        "cross_job://job/..",
        "file:///etc/passwd",
        "s3://bucket/key",
        "tinker://j/weights/../x",
        "tinker://../weights/x",
        "tinker://j/weights/a/b",
        "tinker:///weights/x",
    ]
    fragments = ["..", "/", "\\", "\x00", "\n", " ", "%2f", "\u2215", "\uff0f", ":", "*", "?"]
    safe = st.text("abcXYZ019._-", min_size=1, max_size=8).filter(lambda s: s[0].isalnum())
    spliced = st.builds(
        lambda a, f, b: a + f + b, safe, st.sampled_from(fragments), st.text("ab.", max_size=4)
    )
    return st.one_of(
        st.sampled_from(fixed),
        spliced,
        spliced.map(lambda n: f"cross_job://{n}/ok"),
        spliced.map(lambda n: f"cross_job://job/{n}"),
        odd_text().filter(lambda t: not t.isascii()),
    ).filter(_unsafe_even_stripped)


def _unsafe_even_stripped(path: str) -> bool:
    """Paths are read with surrounding whitespace dropped: keep only those that are
    still invalid then."""
    try:
        parse_checkpoint_path(path)
    except ValueError:
        return True
    return False


# --------------------------------------------------------------------------- field rules


@attrs.frozen
class Rule:
    """A validated field and the values that break it."""

    path: tuple[str | int, ...]
    values: Callable[[], st.SearchStrategy[Any]]
    required: bool = True  # removing it must be refused too


def _id() -> st.SearchStrategy[Any]:
    return _not(str) | unknown_ids() | st.just("")


def _str() -> st.SearchStrategy[Any]:
    return _not(str) | st.just("")


def _int(lo: int | None, hi: int = INT64_MAX) -> Callable[[], st.SearchStrategy[Any]]:
    return lambda: _not(int) | ints_outside(lo, hi) | st.sampled_from([1.5, 1e300, -1e300])


def _float(
    lo: float | None = None, hi: float | None = None
) -> Callable[[], st.SearchStrategy[Any]]:
    def values() -> st.SearchStrategy[Any]:
        options = [_not(int, float)]
        if lo is not None:
            options.append(
                st.floats(
                    max_value=lo,
                    exclude_max=True,
                    allow_nan=False,
                    allow_infinity=False,
                    min_value=-1e300,
                )
            )
        if hi is not None:
            options.append(st.floats(min_value=hi, max_value=1e300, allow_nan=False))
        return st.one_of(options)

    return values


def _enum() -> st.SearchStrategy[Any]:
    return _not(str) | odd_text()


def _bool() -> st.SearchStrategy[Any]:
    return _not(bool)


def _tokens() -> st.SearchStrategy[Any]:
    return st.one_of(
        _not(list),
        st.lists(st.integers(-(2**40), -1), min_size=1, max_size=4),
        st.lists(st.integers(2**31, 2**62), min_size=1, max_size=4),
        st.lists(_not(int), min_size=1, max_size=4),
    )


def _tensor_data() -> st.SearchStrategy[Any]:
    return st.one_of(
        _not(list),
        st.lists(st.sampled_from(["x", None, [1], {"a": 1}, True]), min_size=4, max_size=4),
    )


def _shape() -> st.SearchStrategy[Any]:
    return st.one_of(
        _not(list),
        st.lists(st.integers(5, 1000), min_size=1, max_size=2),  # holds more than the data
        st.just([2, 3]),
        st.lists(st.integers(-5, -1), min_size=1, max_size=2),
        st.just([1] * 17),
        st.lists(_not(int), min_size=1, max_size=2),
    )


def _data_list() -> st.SearchStrategy[Any]:
    return _not(list) | st.just([]) | st.lists(_not(dict), min_size=1, max_size=3)


def _obj() -> st.SearchStrategy[Any]:
    return _not(dict)


def _str_map() -> st.SearchStrategy[Any]:
    return _not(dict) | st.dictionaries(st.text(max_size=4), _not(str), min_size=1, max_size=2)


def _loss_config() -> st.SearchStrategy[Any]:
    return _not(dict) | st.dictionaries(
        st.text(min_size=1, max_size=4),
        st.sampled_from([[1], {"a": 1}, [[]]]),
        min_size=1,
        max_size=2,
    )


def _type(expected: str) -> Callable[[], st.SearchStrategy[Any]]:
    return lambda: (_not(str) | odd_text()).filter(lambda v: v != expected)


def _names() -> st.SearchStrategy[Any]:
    return _not(str) | unsafe_names()


def _forward_rules(key: str) -> list[Rule]:
    d: tuple[str | int, ...] = (key, "data", 0)
    inputs = (*d, "loss_fn_inputs")
    return [
        Rule(("model_id",), _id),
        Rule(("seq_id",), _int(1)),
        Rule((key,), _obj),
        Rule((key, "data"), _data_list),
        Rule((key, "loss_fn"), lambda: _not(str) | st.just("") | odd_text()),
        Rule((key, "loss_fn_config"), _loss_config, required=False),
        Rule(d, _obj),
        Rule((*d, "model_input"), _obj),
        Rule((*d, "model_input", "chunks"), lambda: _not(list)),
        Rule((*d, "model_input", "chunks", 0, "tokens"), _tokens),
        Rule(
            (*d, "model_input", "chunks", 0, "type"), lambda: odd_text() | _not(str), required=False
        ),
        Rule(
            (*inputs, "target_tokens", "dtype"),
            lambda: _enum().filter(lambda v: v not in ("int64", "float32")),
        ),
        Rule((*inputs, "target_tokens", "shape"), _shape, required=False),
        Rule((*inputs, "target_tokens", "data"), _tensor_data),
        Rule((*inputs, "weights", "shape"), _shape, required=False),
        Rule((*inputs, "weights", "data"), _tensor_data),
        Rule(
            (*inputs, "weights", "dtype"),
            lambda: _enum().filter(lambda v: v not in ("int64", "float32")),
        ),
    ]


#: The validated fields of every endpoint with a body the trainer reads.
RULES: dict[str, list[Rule]] = {
    "create_session": [
        Rule(
            ("tags",),
            lambda: _not(list) | st.lists(_not(str), min_size=1, max_size=2),
            required=False,
        ),
        Rule(("user_metadata",), _str_map, required=False),
        Rule(("sdk_version",), _str, required=False),
        Rule(("type",), _type("create_session"), required=False),
    ],
    "session_heartbeat": [Rule(("session_id",), _id)],
    "create_model": [
        Rule(("session_id",), _id),
        Rule(("model_seq_id",), _int(0)),
        Rule(("base_model",), _str),
        Rule(("lora_config",), _obj, required=False),
        Rule(("lora_config", "rank"), _int(0, 1 << 16)),
        Rule(("lora_config", "train_mlp"), _bool, required=False),
        Rule(("lora_config", "train_attn"), _bool, required=False),
        Rule(("lora_config", "train_unembed"), _bool, required=False),
        Rule(("user_metadata",), _str_map, required=False),
        Rule(("type",), _type("create_model"), required=False),
    ],
    "get_info": [Rule(("model_id",), _id)],
    "forward": _forward_rules("forward_input"),
    "forward_backward": _forward_rules("forward_backward_input"),
    "optim_step": [
        Rule(("model_id",), _id),
        Rule(("seq_id",), _int(1)),
        Rule(("adam_params",), _obj),
        Rule(("adam_params", "learning_rate"), _float(lo=0.0), required=False),
        Rule(("adam_params", "beta1"), _float(lo=0.0, hi=1.0), required=False),
        Rule(("adam_params", "beta2"), _float(lo=0.0, hi=1.0), required=False),
        Rule(("adam_params", "eps"), _float(lo=0.0), required=False),
        Rule(("adam_params", "weight_decay"), _float(lo=0.0), required=False),
        Rule(("adam_params", "grad_clip_norm"), _float(lo=0.0), required=False),
        Rule(("grad_accumulation_normalization",), _enum, required=False),
        Rule(("type",), _type("optim_step"), required=False),
    ],
    "save_weights": [
        Rule(("model_id",), _id),
        Rule(("seq_id",), _int(1)),
        Rule(("path",), _names),
        Rule(("ttl_seconds",), _int(1), required=False),
        Rule(("type",), _type("save_weights"), required=False),
    ],
    "load_weights": [
        Rule(("model_id",), _id),
        Rule(("seq_id",), _int(1)),
        Rule(("path",), _names),
        Rule(("optimizer",), _bool),
        Rule(("type",), _type("load_weights"), required=False),
    ],
    "save_weights_for_sampler": [
        Rule(("model_id",), _id),
        Rule(("seq_id",), _int(1)),
        Rule(("path",), _names),
        Rule(("checkpoint_type",), _enum, required=False),
        Rule(("ttl_seconds",), _int(1), required=False),
        Rule(("type",), _type("save_weights_for_sampler"), required=False),
    ],
    "unload_model": [Rule(("model_id",), _id)],
    "retrieve_future": [
        Rule(("request_id",), _id),
        Rule(("allow_metadata_only",), _bool, required=False),
    ],
    "create_sampling_session": [
        Rule(("session_id",), _id),
        Rule(("sampling_session_seq_id",), _int(0)),
        Rule(("base_model",), lambda: _not(str), required=False),
        Rule(("type",), _type("create_sampling_session"), required=False),
    ],
    "asample": [
        Rule(("prompt",), _obj),
        Rule(("prompt", "chunks", 0, "tokens"), _tokens),
        Rule(("num_samples",), _int(1, 1 << 16), required=False),
        Rule(("sampling_params",), _obj),
        Rule(("sampling_params", "max_tokens"), _int(0), required=False),
        Rule(("sampling_params", "temperature"), _float(lo=0.0), required=False),
        Rule(("sampling_params", "top_p"), lambda: _float(hi=1.0)() | st.just(0.0), required=False),
        Rule(("sampling_params", "top_k"), _int(-1), required=False),
        Rule(("sampling_params", "seed"), _int(None), required=False),
        Rule(("model_path",), _names, required=False),
        Rule(("base_model",), lambda: _not(str), required=False),
        Rule(("type",), _type("sample"), required=False),
    ],
}

#: Endpoints that accept any JSON object: only structural cases apply.
ANY_OBJECT = ("client/config", "client/dynamic_config", "telemetry")


@attrs.frozen
class FieldCase:
    endpoint: str
    path: tuple[str | int, ...]
    value: Any
    remove: bool
    ascii_json: bool

    def body(self, ids: Ids) -> bytes:
        obj = template(self.endpoint, ids)
        parent: Any = obj
        for key in self.path[:-1]:
            parent = parent[key]
        last = self.path[-1]
        if self.remove:
            del parent[last]
        else:
            parent[last] = self.value
        return json.dumps(obj, ensure_ascii=self.ascii_json).encode("utf-8")

    @property
    def field(self) -> str:
        return str(self.path[-1])


@attrs.frozen
class StructuralCase:
    endpoint: str
    kind: str
    raw: bytes
    headers: tuple[tuple[str, str], ...] = ()


@st.composite
def field_cases(draw: st.DrawFn, endpoints: tuple[str, ...] = tuple(RULES)) -> FieldCase:
    endpoint = draw(st.sampled_from(endpoints))
    rule = draw(st.sampled_from(RULES[endpoint]))
    remove = rule.required and draw(st.integers(0, 9)) == 0
    value = None if remove else draw(rule.values())
    return FieldCase(endpoint, rule.path, value, remove, draw(st.booleans()))


#: A session finish for a session that does not exist: its body is read all the same.
FINISH = "sessions/sess-fuzz-unknown/finish"


def structural_cases(limit: int) -> st.SearchStrategy[StructuralCase]:
    """Bodies broken as a whole, for any POST endpoint; ``limit`` is the trainer's
    request size limit."""
    endpoints = st.sampled_from(sorted((*RULES, *ANY_OBJECT, FINISH)))
    depth = st.integers(1100, 5000)
    raws: list[tuple[str, st.SearchStrategy[bytes]]] = [
        ("not json", st.binary(min_size=1, max_size=64).filter(_not_json)),
        ("truncated", st.sampled_from([b"{", b'{"a": ', b'{"a": "x', b"[", b"nul"])),
        ("empty", st.just(b"")),
        ("invalid utf-8", st.sampled_from([b'{"a": "\xff\xfe"}', b'{"\xc3\x28": 1}'])),
        ("lone surrogate", st.sampled_from([b'{"a": "\\ud800"}', b'{"a": "\\udfff x"}'])),
        (
            "non-finite literal",
            st.sampled_from(
                [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1e999}']
            ),
        ),
        ("too deep", depth.map(lambda d: b'{"a": ' + b"[" * d + b"]" * d + b"}")),
        ("byte order mark", st.just(b'\xef\xbb\xbf{"a": 1}')),
        ("not an object", st.sampled_from([b"[]", b"1", b'"s"', b"null", b"true", b"[{}]"])),
        (
            "oversize",
            st.integers(1, 4096).map(lambda extra: b'{"pad": "' + b"x" * (limit + extra) + b'"}'),
        ),
    ]
    kinds = st.sampled_from(raws).flatmap(lambda pair: st.tuples(st.just(pair[0]), pair[1]))
    # Bytes that are no JSON either: a JSON-only endpoint reads its body as JSON whatever
    # the label, so ``{}`` labelled protobuf is a valid client/config request.
    labelled = st.tuples(
        st.sampled_from(["protobuf", "zstd", "gzip"]),
        st.binary(min_size=1, max_size=64).filter(_not_json),
    ).map(
        lambda pair: (
            f"labelled {pair[0]}",
            pair[1],
            (("Content-Type", "application/x-protobuf"),)
            if pair[0] == "protobuf"
            else (("Content-Encoding", pair[0]),),
        )
    )
    return st.one_of(
        st.builds(lambda e, kr: StructuralCase(e, kr[0], kr[1]), endpoints, kinds),
        st.builds(lambda e, k: StructuralCase(e, k[0], k[1], k[2]), endpoints, labelled),
    )


def _not_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return True
    return False
