"""The pure helpers for tinker 0.38 clients, checked against tinker's own request
models and parsers wherever tinker has one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tinker
from tinker import types
from tinker._exceptions import TinkerError
from tinker._version import __version__ as tinker_version
from tinker.lib._auth_token_provider import ApiKeyAuthProvider
from tinker.lib.public_interfaces.sampling_client import _check_prompt_logprobs_last_n_honored
from tinker.types.checkpoint import ParsedCheckpointTinkerPath

from firetitan._checkpoint_paths import CheckpointRef, parse_checkpoint_path
from firetitan._wire import WireError
from firetitan.local.checkpoints import Kind
from firetitan.local.tinker import compat as tc


def dump(model: Any) -> dict[str, Any]:
    """A tinker request model as tinker puts it on the wire."""
    body: dict[str, Any] = model.model_dump(exclude_unset=False, exclude_none=True, mode="json")
    return body


# --------------------------------------------------------------------------- clients


@pytest.mark.parametrize("key", ["tml-local-0123", "fw_abc123", "local-key", "TML-x"])
def test_api_key_rule_matches_tinker(key: str) -> None:
    try:
        ApiKeyAuthProvider(key)
        accepted = True
    except TinkerError:
        accepted = False
    assert tc.tinker_accepts_api_key(key) is accepted


def test_jwt_keys_are_accepted() -> None:
    assert tc.tinker_accepts_api_key("eyJhbGciOiJIUzI1NiJ9.e30.sig")


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        (tinker_version, True),
        ("0.38.0", True),
        ("0.23.0", False),
        ("garbage", False),
        (None, False),
        (38, False),
    ],
)
def test_sdk_version_tells_tinker_from_fireworks(version: object, expected: bool) -> None:
    assert tc.is_tinker_sdk(version) is expected


def test_sample_sequence_ids() -> None:
    ids = tc.sample_sequence_ids("s:sample:0:1000000000", 3)
    assert len(ids) == len(set(ids)) == 3
    assert ids == tc.sample_sequence_ids("s:sample:0:1000000000", 3)  # a retry: same ids
    assert not set(ids) & set(tc.sample_sequence_ids("s:sample:0:1000000001", 3))
    with pytest.raises(ValueError):
        tc.sample_sequence_ids("", 1)
    with pytest.raises(ValueError):
        tc.sample_sequence_ids("k", 0)


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("kind", "tinker_type"),
    [("state", "training"), ("sampler", "sampler"), ("external", "external")],
)
def test_tinker_paths_parse_in_tinker_and_back(kind: Kind, tinker_type: str) -> None:
    path = tc.tinker_path("job-1", kind, "step_10")
    parsed = ParsedCheckpointTinkerPath.from_tinker_path(path)
    assert parsed.training_run_id == "job-1"
    assert parsed.checkpoint_type == tinker_type
    assert tc.parse_tinker_path(path) == tc.TinkerPath("job-1", kind, "step_10")
    assert str(tc.parse_tinker_path(path)) == path


@pytest.mark.parametrize(
    "path",
    [
        "tinker://job-1/other_weights/x",
        "tinker://job-1/weights",
        "tinker://job-1/weights/a/b",
        "tinker://job-1/weights/..",
        "tinker://../weights/x",
        "tinker:///weights/x",
        "cross_job://job-1/x",
        "step-1",
        None,
    ],
)
def test_bad_tinker_paths_are_refused(path: object) -> None:
    with pytest.raises(ValueError):
        tc.parse_tinker_path(path)


def test_store_paths() -> None:
    this = tc.store_path("tinker://job-1/weights/step-4", kind="state", job_id="job-1")
    assert parse_checkpoint_path(this) == CheckpointRef("step-4")
    other = tc.store_path(" tinker://job-0/weights/step-4 ", kind="state", job_id="job-1")
    assert parse_checkpoint_path(other) == CheckpointRef("step-4", "job-0")
    sampler = tc.store_path("tinker://job-1/sampler_weights/s", kind="sampler", job_id="job-1")
    assert sampler == "s"
    # Other forms are the store's to check.
    assert (
        tc.store_path("cross_job://job-0/x", kind="state", job_id="job-1") == "cross_job://job-0/x"
    )
    assert tc.store_path("step-4", kind="state", job_id="job-1") == "step-4"
    with pytest.raises(ValueError, match="sampler_weights"):
        tc.store_path("tinker://job-1/sampler_weights/s", kind="state", job_id="job-1")


# --------------------------------------------------------------------------- options


def _sample_body(**options: Any) -> dict[str, Any]:
    return dump(
        types.SampleRequest(
            sampling_session_id="s:sample:0",
            seq_id=0,
            num_samples=1,
            prompt=tinker.ModelInput.from_ints([1, 2, 3, 4]),
            sampling_params=types.SamplingParams(max_tokens=1),
            **options,
        )
    )


def test_tinkers_default_bodies_pass() -> None:
    tc.check_tinker_options(
        "create_model",
        dump(types.CreateModelRequest(session_id="s", model_seq_id=0, base_model="b")),
    )
    tc.check_tinker_options(
        "load_weights",
        dump(
            types.LoadWeightsRequest(
                session_id="s",
                model_seq_id=1,
                path="tinker://job-1/weights/step-8",
                optimizer=False,
                optimizer_config=types.AdamOptimizerConfig(),
            )
        ),
    )
    tc.check_tinker_options(
        "optim_step",
        dump(types.OptimStepRequest(optim_params=types.AdamParams(), model_id="m", seq_id=1)),
    )
    tc.check_tinker_options("asample", _sample_body())
    tc.check_tinker_options("asample", _sample_body(prompt_logprobs=True, prompt_logprobs_last_n=2))
    # Top-k, target and alternative-token logprobs are served (checked by the rules).
    target = {"data": [5, 6, 7], "dtype": "int64", "shape": [3, 1]}
    tc.check_tinker_options(
        "asample",
        _sample_body(
            topk_prompt_logprobs=3,
            topk_sample_logprobs=1,
            prompt_alt_tokens_k=2,
            target_prompt_logprobs=target,
        ),
    )
    tc.check_tinker_options("forward", {"anything": 1})


DIMUON = types.DimuonOptimizerConfig()

REFUSED: list[tuple[str, dict[str, Any], str]] = [
    (
        "create_model",
        dump(
            types.CreateModelRequest(
                session_id="s", model_seq_id=0, base_model="b", optimizer_config=DIMUON
            )
        ),
        "optimizer_config.type",
    ),
    (
        "load_weights",
        dump(
            types.LoadWeightsRequest(
                session_id="s", model_seq_id=0, path="p", optimizer=False, optimizer_config=DIMUON
            )
        ),
        "optimizer_config.type",
    ),
    (
        "load_weights",
        dump(
            types.LoadWeightsRequest(
                model_id="m", seq_id=2, path="p", optimizer=False, weights_access_token="tok"
            )
        ),
        "weights_access_token",
    ),
    (
        "optim_step",
        dump(
            types.OptimStepRequest(
                optim_params=types.DimuonParams(learning_rate=0.01), model_id="m", seq_id=1
            )
        ),
        "optimizer_params",
    ),
    ("create_model", {"optimizer_config": "adamw"}, "optimizer_config"),
    ("create_model", {"optimizer_config": {"type": "adamw", "lr": 1}}, "optimizer_config"),
]


@pytest.mark.parametrize(
    ("endpoint", "body", "field"), REFUSED, ids=[f"{e}-{f}" for e, _, f in REFUSED]
)
def test_options_this_trainer_cannot_honour_are_refused(
    endpoint: str, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(WireError) as info:
        tc.check_tinker_options(endpoint, body)
    assert info.value.field == field


def test_masked_prompt_logprobs_pass_tinkers_check() -> None:
    logprobs = [np.nan, -1.0, -2.0, -3.0]
    masked = tc.mask_prompt_logprobs(logprobs, 2)
    np.testing.assert_array_equal(masked, [np.nan, np.nan, -2.0, -3.0])
    response = tinker.SampleResponse(sequences=[], prompt_logprobs_np=masked)
    _check_prompt_logprobs_last_n_honored(response, 2)  # raises if earlier ones are scored
    with pytest.raises(RuntimeError):
        _check_prompt_logprobs_last_n_honored(
            tinker.SampleResponse(sequences=[], prompt_logprobs_np=np.array(logprobs)), 2
        )
    np.testing.assert_array_equal(tc.mask_prompt_logprobs(logprobs, None), logprobs)
    for bad in (0, 4):
        with pytest.raises(WireError):
            tc.mask_prompt_logprobs(logprobs, bad)
