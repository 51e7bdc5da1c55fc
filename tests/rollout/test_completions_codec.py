"""The sans-IO side of deployment sampling: SSE framing and the fold of a stream."""

from __future__ import annotations

import json

import pytest

from firetitan import _wire

STREAM = (
    b": a comment\r\n"
    b'data: {"choices": [{"logprobs": {"content": [{"logprob": -1.5}]}}]}\r\n\r\n'
    b"event: ping\ndata: alive\n\n"
    b'data: {"choices": [{"finish_reason": "stop",\n'
    b'data:  "raw_output": {"completion_token_ids": [42]}}]}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("size", [1, 3, 7, len(STREAM)])
def test_events_survive_any_chunking_and_multi_line_data(size: int) -> None:
    decoder = _wire.SSEDecoder()
    events = []
    for i in range(0, len(STREAM), size):
        events += decoder.feed(STREAM[i : i + size])
    assert [e.event for e in events] == ["message", "ping", "message", "message"]
    fold = _wire.CompletionStream([1], echo=False, full_distribution=True)
    for event in events:
        fold.add(event)
    completion = fold.result()
    # No sampling_logprob at temperature 1: the raw logprob is the sampling one.
    assert (completion.tokens, completion.logprobs, completion.finish_reason) == (
        [42],
        [-1.5],
        "stop",
    )
    assert fold.done


def test_a_reshaped_distribution_needs_sampling_logprob() -> None:
    fold = _wire.CompletionStream([1], echo=False, full_distribution=False)
    row = {"logprob": -1.5}
    chunk = {
        "choices": [
            {
                "finish_reason": "length",
                "logprobs": {"content": [row]},
                "raw_output": {"completion_token_ids": [3]},
            }
        ]
    }
    fold.add(_wire.SSEEvent("message", json.dumps(chunk)))
    with pytest.raises(_wire.WireError, match="sampling_logprob"):
        fold.result()


def test_a_stream_without_finish_reason_is_truncated_even_after_done() -> None:
    fold = _wire.CompletionStream([1], echo=False, full_distribution=True)
    fold.add(_wire.SSEEvent("message", "[DONE]"))
    with pytest.raises(_wire.StreamTruncated):
        fold.result()


def test_error_payloads_carry_their_status_and_transience() -> None:
    fold = _wire.CompletionStream([1], echo=False, full_distribution=True)
    with pytest.raises(_wire.UpstreamError) as info:
        fold.add(_wire.SSEEvent("message", '{"error": {"status": 503, "message": "later"}}'))
    assert info.value.status == 503 and info.value.transient
    with pytest.raises(_wire.UpstreamError) as info:
        fold.add(_wire.SSEEvent("error", '{"error": {"status_code": 400, "message": "no"}}'))
    assert info.value.status == 400 and not info.value.transient
