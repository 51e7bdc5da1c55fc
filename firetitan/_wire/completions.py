"""Deployment sampling bodies (deployment.md §5): the completions request, the SSE
framing of its streamed answer, and the fold of the stream into one completion.

Sans-IO like the rest of the package: `SSEDecoder` takes bytes as they arrive and
returns whole events; `CompletionStream` takes those events and, at the end, gives a
`Completion` or raises the exception class that says what the caller may do about it
(`StreamTruncated` and a transient `UpstreamError` may be retried; anything else not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from firetitan._wire._json import WireError, loads

__all__ = [
    "FINISH_REASONS",
    "Completion",
    "CompletionStream",
    "SSEDecoder",
    "SSEEvent",
    "StreamTruncated",
    "UpstreamError",
    "completion_body",
]

#: Finish reasons of a successful completion; any other one is an upstream failure.
FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})
#: HTTP statuses that an upstream error in a stream may carry and still be retried.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_KEEPALIVE_EVENTS = frozenset({"ping", "heartbeat", "keepalive"})


class StreamTruncated(WireError):
    """The stream ended without a finish reason: the completion is incomplete."""

    def __init__(self, detail: str) -> None:
        super().__init__("stream", detail)


class UpstreamError(WireError):
    """The deployment reported an error inside the stream.

    Attributes:
        status: The HTTP status the error names, if any.
        transient: Whether that status is one a retry may cure.
    """

    def __init__(self, detail: str, status: int | None) -> None:
        super().__init__("stream", detail)
        self.status = status
        self.transient = status in TRANSIENT_STATUSES


@attrs.frozen
class SSEEvent:
    """One server-sent event: its ``event`` name ("message" by default) and data."""

    event: str
    data: str


class SSEDecoder:
    """Incremental SSE framing: events end at a blank line, ``data:`` lines join with
    newlines, ``:`` lines are comments. Accepts ``\\n`` and ``\\r\\n`` line ends and
    chunks that split lines anywhere."""

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Return the events completed by ``chunk``."""
        self._buffer += chunk
        events: list[SSEEvent] = []
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if self._data or self._event:
                    events.append(SSEEvent(self._event or "message", "\n".join(self._data)))
                self._event, self._data = "", []
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    self._data.append(value)
                elif name == "event":
                    self._event = value
        return events


def completion_body(
    model: str,
    prompt: Sequence[int],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: Sequence[str],
    top_logprobs: int,
    echo: bool,
) -> dict[str, Any]:
    """The streamed ``n: 1`` completions request for one sample (deployment.md §5.1).

    Logprobs are always asked for: the behaviour-policy logprob of every sampled token is
    what an RL loop trains against.
    """
    body: dict[str, Any] = {
        "model": model,
        "prompt": [int(t) for t in prompt],
        "n": 1,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "stream": True,
        "raw_output": True,
        "perf_metrics_in_response": True,
        "logprobs": True,
    }
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    if top_logprobs:
        body["top_logprobs"] = top_logprobs
    if echo:
        body["echo"] = True
    return body


@attrs.frozen
class Completion:
    """One finished completion.

    Attributes:
        tokens: The generated token ids (the prompt excluded).
        logprobs: The behaviour-policy (``sampling_logprob``) logprob of each.
        finish_reason: ``stop``, ``length`` or ``tool_calls``.
        prompt_logprobs: With echo: the raw model logprob of each prompt token given
            the ones before it, None for the first.
        prompt_top_logprobs: With echo and ``top_logprobs``: per prompt token, the
            ``(token_id, logprob)`` pairs of the most likely tokens there (None for the
            first).
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


class CompletionStream:
    """Folds the events of one streamed completion into a `Completion`.

    Args:
        prompt: The prompt ids that were sent.
        echo: Whether the prompt was echoed (prompt logprobs asked for).
        full_distribution: temperature 1, top_p 1, no top_k: the raw logprob is then
            the sampling logprob, so a deployment may leave ``sampling_logprob`` out.
    """

    def __init__(self, prompt: Sequence[int], *, echo: bool, full_distribution: bool) -> None:
        self._prompt = list(prompt)
        self._echo = echo
        self._full = full_distribution
        self._rows: list[Any] = []
        self._finish: str | None = None
        self._ids: Any = None
        self.done = False

    def add(self, event: SSEEvent) -> None:
        """Take one event.

        Raises:
            UpstreamError: The deployment reported an error, or a failed finish reason.
            WireError: A payload that is not the documented shape.
        """
        if event.event == "error":
            _raise_upstream(_json_or_text(event.data))
        data = event.data.strip()
        if not data:
            return
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = loads(data)
        except ValueError:
            if event.event in _KEEPALIVE_EVENTS:
                return
            raise WireError("stream", f"a data line that is not JSON: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise WireError("stream", "a chunk that is not a JSON object")
        if chunk.get("error") is not None:
            _raise_upstream(chunk)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise WireError("stream.choices", "missing or not a list")
        for choice in choices:
            if not isinstance(choice, dict):
                raise WireError("stream.choices", "an entry that is not an object")
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                self._rows.extend(logprobs["content"])
            finish = choice.get("finish_reason")
            if finish is not None:
                if finish not in FINISH_REASONS:
                    raise UpstreamError(f"the completion finished with {finish!r}", None)
                self._finish = finish
            raw = choice.get("raw_output")
            if isinstance(raw, dict) and raw.get("completion_token_ids") is not None:
                self._ids = raw["completion_token_ids"]  # the last one holds them all

    def result(self) -> Completion:
        """The completion, once the stream has ended.

        Raises:
            StreamTruncated: No finish reason arrived (retry the request).
            WireError: The stream finished but its content is inconsistent.
        """
        if self._finish is None:
            raise StreamTruncated(
                f"the stream ended without a finish reason after {len(self._rows)} tokens"
            )
        if not isinstance(self._ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self._ids
        ):
            raise WireError("stream.raw_output.completion_token_ids", "missing or not token ids")
        ids: list[int] = self._ids
        rows = self._rows
        if len(rows) != len(ids):
            raise WireError(
                "stream.logprobs.content", f"{len(rows)} logprob rows for {len(ids)} token ids"
            )
        start = 0
        prompt_logprobs = prompt_top = None
        if self._echo:
            start = len(self._prompt)
            if ids[:start] != self._prompt:
                raise WireError(
                    "stream.raw_output.completion_token_ids", "does not start with the prompt"
                )
            # Row 0 has no context: its value, whatever the deployment sent, means nothing.
            prompt_logprobs = [None] + [_number(rows[i], "logprob", i) for i in range(1, start)]
            if any(isinstance(r, dict) and r.get("top_logprobs") for r in rows[1:start]):
                prompt_top = [None] + [_top(rows[i], i) for i in range(1, start)]
        logprobs = [self._sampling_logprob(rows[i], i) for i in range(start, len(ids))]
        return Completion(
            tokens=ids[start:],
            logprobs=logprobs,
            finish_reason=self._finish,
            prompt_logprobs=prompt_logprobs,
            prompt_top_logprobs=prompt_top,
        )

    def _sampling_logprob(self, row: Any, i: int) -> float:
        value = row.get("sampling_logprob") if isinstance(row, dict) else None
        if value is None and self._full:
            return _number(row, "logprob", i)
        if value is None:
            raise WireError(
                f"stream.logprobs.content[{i}].sampling_logprob",
                "missing; it is needed when temperature, top_p or top_k reshape the distribution",
            )
        return _number(row, "sampling_logprob", i)


def _number(row: Any, key: str, i: int) -> float:
    value = row.get(key) if isinstance(row, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise WireError(f"stream.logprobs.content[{i}].{key}", f"not a number: {value!r}")
    return float(value)


def _top(row: Any, i: int) -> list[tuple[int, float]]:
    entries = row.get("top_logprobs") if isinstance(row, dict) else None
    if not isinstance(entries, list):
        raise WireError(f"stream.logprobs.content[{i}].top_logprobs", "missing")
    out = []
    for entry in entries:
        token = entry.get("token_id") if isinstance(entry, dict) else None
        if isinstance(token, bool) or not isinstance(token, int):
            where = f"stream.logprobs.content[{i}].top_logprobs"
            raise WireError(where, "an entry without token_id")
        out.append((token, _number(entry, "logprob", i)))
    return out


def _json_or_text(data: str) -> Any:
    try:
        return loads(data)
    except ValueError:
        return data


def _raise_upstream(payload: Any) -> None:
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    status = None
    message = str(error)
    if isinstance(error, dict):
        for key in ("status_code", "status"):
            value = error.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                status = value
                break
        message = str(error.get("message") or error)
    where = f" (HTTP {status})" if status is not None else ""
    raise UpstreamError(f"the deployment reported an error{where}: {message[:500]}", status)
