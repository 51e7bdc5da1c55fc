"""Stability records: what a ``stable_reinforce`` datum may claim about its tokens, and
the sampler logprobs it trains on (the trainer's record, never the client's copy)."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker.types.provenance_spans import PromptProvenanceSpan, SampledProvenanceSpan

from firetitan.local.engine import UserError
from firetitan.local.stability import StabilityRecords

PROMPT = [1, 2, 3]
SAMPLED = [7, 8, 9]
RECORDED = [-0.5, -1.5, -2.5]


def sampled(tokens: list[int], logprobs: list[float]) -> tinker.SampleResponse:
    sequence = tinker.SampledSequence(
        stop_reason="stop",
        sequence_id="engine-0",
        tokens_np=np.asarray(tokens, np.int32),
        logprobs_np=np.asarray(logprobs, np.float32),
    )
    return tinker.SampleResponse(sequences=[sequence])


def records() -> StabilityRecords:
    kept = StabilityRecords()
    kept.record("sess-a", ["req-1:0"], PROMPT, sampled(SAMPLED, RECORDED))
    return kept


def datum(
    targets: list[int] | None = None, advantages: list[float] | None = None, spans: bool = True
) -> tinker.Datum:
    # Inputs: the prompt and all but the last sampled token; targets shifted by one.
    tokens = PROMPT + SAMPLED[:-1]
    out = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": np.asarray(targets or PROMPT[1:] + SAMPLED, dtype=np.int64),
            "logprobs": np.full(5, -9.0, np.float32),  # the client's copy: ignored
            "advantages": np.asarray(advantages or [0, 0, 1, 1, 1], dtype=np.float32),
        },
    )
    if not spans:
        return out
    return out.with_provenance(
        model_input=[
            PromptProvenanceSpan(sequence_id="req-1:0", length=3),
            SampledProvenanceSpan(sequence_id="req-1:0", length=2),
        ],
        loss_fn_inputs=[
            PromptProvenanceSpan(sequence_id="req-1:0", offset=1, length=2),
            SampledProvenanceSpan(sequence_id="req-1:0", length=3),
        ],
    )


def test_resolve_takes_the_recorded_sampler_logprobs() -> None:
    (resolved,) = records().resolve("sess-a", [datum()])
    logprobs = resolved.loss_fn_inputs["logprobs"].to_numpy()
    np.testing.assert_array_equal(logprobs, np.asarray([0, 0, *RECORDED], np.float32))


@pytest.mark.parametrize(
    ("session", "bad", "message"),
    [
        ("sess-b", datum(), "no stability record"),
        ("sess-a", datum(spans=False), "needs provenance"),
        ("sess-a", datum(targets=[2, 3, 7, 8, 6]), "differ from the tokens"),
        ("sess-a", datum(advantages=[1, 0, 1, 1, 1]), "advantages must be 0 on prompt"),
    ],
    ids=["other-session", "no-provenance", "other-tokens", "prompt-advantage"],
)
def test_resolve_refuses_claims_the_records_do_not_back(
    session: str, bad: tinker.Datum, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        records().resolve(session, [datum(), bad])


def test_records_are_bounded() -> None:
    kept = StabilityRecords(max_sequences=2)
    for i in range(5):
        kept.record("s", [f"r{i}"], [0], sampled([1], [-1.0]))
    assert len(kept) == 2
