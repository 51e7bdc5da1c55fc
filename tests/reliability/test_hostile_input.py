"""Hostile input: property-based fuzzing of every endpoint's body and of the client's
arguments (hypothesis).

Trainer side: every case (`hostile.py`) gets a 4xx JSON error that names what is wrong,
or is accepted and fails its future with a ``user`` error; never a 5xx, a traceback or a
success. Client side: every hostile argument raises a typed error at the call site or
fails the call's future with one, within seconds. On both sides the trainer keeps
serving and the model's full training state (weights, gradients, optimizer moments and
step, accumulation counters, sampling RNG) is byte-for-byte what it was before.

The short form replays a fixed set of cases (``derandomize``), so CI is reproducible;
the long form draws fresh cases on every run.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import tinker
from hypothesis import given
from hypothesis import strategies as st
from shared import FAST_TRAINER

from firetitan import (
    BadRequestError,
    ClientConfig,
    FiretitanError,
    FiretitanServiceClient,
    FiretitanTrainingClient,
    FutureTimeoutError,
    RetryPolicy,
    Timeouts,
)
from firetitan.local import LocalTrainer

from .common import local_model, ordered_log
from .conftest import Figures, Scale, scales
from .hostile import (
    BASE_MODEL,
    FieldCase,
    Ids,
    RawClient,
    StructuralCase,
    _not,
    datum,
    field_cases,
    fuzz_settings,
    odd_text,
    structural_cases,
    unsafe_names,
)

LIMIT = 256 * 1024  # the fuzzed trainer's request size limit


# --------------------------------------------------------------------------- the victim


class Victim:
    """The model every fuzz case aims at, through a raw protocol client."""

    def __init__(self, client: RawClient, trainer: LocalTrainer) -> None:
        self.client = client
        self.trainer = trainer
        answer = client.post(
            "create_session",
            {"tags": [], "user_metadata": {}, "sdk_version": "0.23.0", "type": "create_session"},
        )
        self.session_id = answer.json["session_id"]
        create = client.submit(
            "create_model",
            {"session_id": self.session_id, "model_seq_id": 0, "base_model": BASE_MODEL},
        )
        self.model_id = client.result(create)["model_id"]
        self.request_id = create
        self.next_seq = 1
        # Some history, so that gradients, moments and counters are not all zero.
        for step in range(2):
            self.run(
                "forward_backward",
                {
                    "forward_backward_input": {
                        "data": [datum([3 + step, 9, 14, 15, 92, 65])],
                        "loss_fn": "cross_entropy",
                    }
                },
            )
            self.run("optim_step", {"adam_params": {"learning_rate": 1e-3}})
        self.run(
            "forward_backward",
            {
                "forward_backward_input": {
                    "data": [datum([2, 7, 1, 8, 2, 8])],
                    "loss_fn": "cross_entropy",
                }
            },
        )
        self.digests = 0

    def ids(self) -> Ids:
        return Ids(self.session_id, self.model_id, self.next_seq, self.request_id)

    def run(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run a valid ordered request at the next seq_id and return its result."""
        body = {**body, "model_id": self.model_id, "seq_id": self.next_seq}
        self.next_seq += 1
        return self.client.result(self.client.submit(endpoint, body))

    def state_digest(self) -> str:
        """A digest of the model's complete training state, through a save_state."""
        self.digests += 1
        name = f"digest-{self.digests}"
        self.run("save_weights", {"path": name})
        assert self.trainer.checkpoint_dir is not None
        folder = self.trainer.checkpoint_dir / self.trainer.job_id / "state" / name
        sha = hashlib.sha256()
        for path in sorted(folder.glob("*.safetensors")):
            sha.update(path.read_bytes())
        return sha.hexdigest()[:16]

    def probe(self) -> Any:
        """Logprobs of a fixed batch (a forward pass changes no state)."""
        out = self.run(
            "forward",
            {"forward_input": {"data": [datum([1, 2, 3, 4, 5])], "loss_fn": "cross_entropy"}},
        )
        return out["loss_fn_outputs"]

    def consumed(self, body: bytes, status: int) -> bool:
        """Whether the trainer spent the current seq_id on this request: it was
        accepted, or refused after its (model_id, seq_id) was read (a hole)."""
        if status not in (200, 400, 422):
            return False
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        return (
            isinstance(obj, dict)
            and obj.get("model_id") == self.model_id
            and type(obj.get("seq_id")) is int
            and obj["seq_id"] == self.next_seq
        )


def _json_error(answer: Any, case: object) -> str:
    assert answer.content_type.startswith("application/json"), (case, answer)
    body = answer.json
    detail = body.get("detail") if isinstance(body, dict) else None
    assert isinstance(detail, str) and detail, (case, body)
    assert "Traceback" not in detail, (case, detail)
    return detail


def _check_field_case(victim: Victim, case: FieldCase, tally: collections.Counter[str]) -> None:
    body = case.body(victim.ids())
    answer = victim.client.request("POST", f"/api/v1/{case.endpoint}", body)
    assert answer.status < 500, (case, answer)
    if victim.consumed(body, answer.status):
        victim.next_seq += 1
    if answer.status == 200:
        # Accepted: only a request whose fault shows when it runs, and then it must
        # fail as the caller's mistake.
        request_id = answer.json.get("request_id")
        assert isinstance(request_id, str), (case, answer)
        outcome = victim.client.outcome(request_id)
        assert "error" in outcome, ("hostile input ran successfully", case, outcome)
        assert outcome.get("category") == "user", (case, outcome)
        assert outcome["error"] and "Traceback" not in outcome["error"], (case, outcome)
        tally[f"{case.endpoint}: accepted, failed as a user error"] += 1
        return
    assert 400 <= answer.status < 500, (case, answer)
    detail = _json_error(answer, case)
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # nested past the parser's limit: a body error, not a field error
    else:
        named = [str(p) for p in case.path if isinstance(p, str)]
        assert named[-1] in detail, (case, detail)
    tally[f"{case.endpoint}: {answer.status}"] += 1


def _check_structural_case(
    victim: Victim, case: StructuralCase, tally: collections.Counter[str]
) -> None:
    answer = victim.client.request(
        "POST", f"/api/v1/{case.endpoint}", case.raw, headers=dict(case.headers)
    )
    assert 400 <= answer.status < 500, (case.endpoint, case.kind, case.raw[:200], answer)
    _json_error(answer, (case.endpoint, case.kind))
    tally[f"{case.kind}: {answer.status}"] += 1


def _fuzz_endpoints(
    scale: Scale,
    trainer: LocalTrainer,
    client: RawClient,
    fields: collections.Counter[str],
    structural: collections.Counter[str],
) -> str:
    """Run the field and structural cases; return the (unchanged) state digest."""
    victim = Victim(client, trainer)
    before, probe = victim.state_digest(), victim.probe()
    count = 0

    def checkpoint() -> None:
        nonlocal count
        count += 1
        if count % scale.check_every == 0:
            assert client.healthy()
            assert victim.state_digest() == before

    @fuzz_settings(scale.field, scale)
    @given(case=field_cases())
    def fuzz_fields(case: FieldCase) -> None:
        _check_field_case(victim, case, fields)
        checkpoint()

    @fuzz_settings(scale.structural, scale)
    @given(case=structural_cases(LIMIT))
    def fuzz_structure(case: StructuralCase) -> None:
        _check_structural_case(victim, case, structural)
        checkpoint()

    fuzz_fields()
    fuzz_structure()
    # Still serving, and the model is exactly where it was.
    assert client.healthy()
    assert victim.state_digest() == before
    assert victim.probe() == probe
    return before


@pytest.mark.parametrize(
    "scale",
    scales(
        short={"field": 300, "structural": 120, "check_every": 100},
        long={"field": 2400, "structural": 900, "check_every": 250},
    ),
)
def test_every_endpoint_refuses_hostile_bodies(
    scale: Scale, tmp_path: Path, figures: Figures
) -> None:
    fields: collections.Counter[str] = collections.Counter()
    structural: collections.Counter[str] = collections.Counter()
    with LocalTrainer(
        "torch",
        size="tiny",
        device="cpu",
        checkpoint_dir=tmp_path,
        max_request_bytes=LIMIT,
        **FAST_TRAINER,
    ) as trainer:
        client = RawClient(trainer.base_url, trainer.api_key)
        try:
            digest = _fuzz_endpoints(scale, trainer, client, fields, structural)
        finally:
            client.close()
    endpoints = {key.split(":")[0] for key in fields}
    figures.record(
        f"fuzz: endpoint bodies ({scale.name})",
        engine="torch",
        cases=sum(fields.values()) + sum(structural.values()),
        field_cases=sum(fields.values()),
        structural_cases=sum(structural.values()),
        endpoints=len(endpoints | {"client/config", "client/dynamic_config", "telemetry"}),
        refused_4xx=sum(n for k, n in (fields + structural).items() if "accepted" not in k),
        accepted_then_failed_as_user_error=sum(n for k, n in fields.items() if "accepted" in k),
        by_status=dict(
            collections.Counter(
                k.rsplit(" ", 1)[-1]
                for k in (fields + structural).elements()
                if "accepted" not in k
            )
        ),
        successes=0,
        server_errors=0,
        state_digest_unchanged=digest,
    )


# --------------------------------------------------------------------------- the client

QUICK_CLIENT = ClientConfig(
    timeouts=Timeouts(connect=2.0, request=10.0, long_poll_read=10.0),
    retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.2, deadline=10.0),
    future_deadline=60.0,
)
GOOD_DATA = [
    tinker.Datum(
        model_input=tinker.ModelInput.from_ints([5, 6, 7, 8]),
        loss_fn_inputs={
            "target_tokens": np.array([6, 7, 8, 9], dtype=np.int64),
            "weights": np.ones(4, dtype=np.float32),
        },
    )
]


def _datum(tokens: Any, targets: Any, weights: Any | None = None) -> tinker.Datum:
    inputs = {"target_tokens": targets}
    if weights is not None:
        inputs["weights"] = weights
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def _hostile_datums() -> st.SearchStrategy[Any]:
    """Builders of datums that tinker lets a user make but the trainer must refuse."""
    n = st.integers(1, 6)
    f32 = np.float32
    return st.one_of(
        n.map(
            lambda k: (
                lambda: _datum(
                    list(range(5, 5 + k)), np.arange(6, 6 + k), np.full(k, np.nan, dtype=f32)
                )
            )
        ),
        n.map(
            lambda k: (
                lambda: _datum(
                    list(range(5, 5 + k)), np.arange(6, 6 + k), np.full(k, np.inf, dtype=f32)
                )
            )
        ),
        n.map(lambda k: lambda: _datum(list(range(5, 5 + k)), np.arange(6, 7 + k))),
        st.integers(-(2**40), -1).map(lambda t: lambda: _datum([t, 5], np.array([5, 6]))),
        st.integers(2**31, 2**62).map(lambda t: lambda: _datum([t, 5], np.array([5, 6]))),
        st.integers(100_000, 2**31 - 1).map(lambda t: lambda: _datum([5, 6], np.array([t, 6]))),
        st.just(lambda: _datum([], np.zeros(0, dtype=np.int64))),
        st.just(lambda: _datum([5, 6], np.array([[6, 7]]))),
        st.just(
            lambda: tinker.Datum(model_input=tinker.ModelInput.from_ints([5, 6]), loss_fn_inputs={})
        ),
        st.just(lambda: _datum(list(range(5000)), np.arange(5000) % 200)),
    )


def _hostile_data() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from([None, 5, "abc", b"x", {"a": 1}, [], [None], [1], [{"model_input": 1}]]),
        st.just(GOOD_DATA[0]),  # a datum, not a list of them
        st.lists(_hostile_datums(), min_size=1, max_size=3),
    )


def _bad_adam() -> st.SearchStrategy[Any]:
    values = {
        "learning_rate": [-1.0, math.nan, math.inf],
        "beta1": [1.0, 1.5, -0.1, math.nan],
        "beta2": [1.0, 2.0, -1.0],
        "eps": [-1e-8, math.inf],
        "weight_decay": [-0.5],
        "grad_clip_norm": [-1.0, math.nan],
    }
    field = st.sampled_from(sorted(values))
    return st.one_of(
        st.sampled_from([None, {}, {"learning_rate": 1e-3}, 5, "adam"]),
        field.flatmap(lambda f: st.sampled_from(values[f]).map(lambda v: (f, v))),
    )


def _bad_ttl() -> st.SearchStrategy[Any]:
    return st.sampled_from([0, -1, True, 1.5, "10", [], 2**70, math.nan])


@st.composite
def client_calls(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A client method and hostile arguments for it."""
    method = draw(
        st.sampled_from(
            [
                "forward",
                "forward_backward",
                "optim_step",
                "save_state",
                "load_state",
                "load_state_with_optimizer",
                "save_weights_for_sampler",
                "resolve_checkpoint_path",
                "create_training_client",
                "create_sampling_client",
                "sample",
            ]
        )
    )
    bad_str = _not(str) | st.just("") | st.just("   ")
    if method in ("forward", "forward_backward"):
        which = draw(st.sampled_from(["data", "loss_fn", "loss_fn_config"]))
        args: dict[str, Any] = {"data": GOOD_DATA, "loss_fn": "cross_entropy"}
        if which == "data":
            args["data"] = draw(_hostile_data())
        elif which == "loss_fn":
            args["loss_fn"] = draw(bad_str | odd_text())
        else:
            args["loss_fn_config"] = draw(
                _not(dict)
                | st.sampled_from(
                    [{"a": math.nan}, {"a": [1]}, {"a": {"b": 1}}, {"a": 2**80}, {5: 1.0}]
                )
            )
        return method, args
    if method == "optim_step":
        if draw(st.booleans()):
            return method, {"adam": draw(_bad_adam())}
        norm = draw(
            _not(str)
            | odd_text().filter(
                lambda t: t.strip().lower() not in ("none", "num_loss_tokens", "num_sequences")
            )
        )
        return method, {"adam": ("learning_rate", 1e-3), "norm": norm}
    if method == "save_state":
        if draw(st.booleans()):
            return method, {"name": draw(_not(str) | unsafe_names())}
        return method, {"name": "ttl-test", "ttl": draw(_bad_ttl())}
    if method in ("load_state", "load_state_with_optimizer"):
        missing = st.integers(0, 10**6).map(lambda i: f"never-saved-{i}")
        return method, {"path": draw(_not(str) | unsafe_names() | missing)}
    if method == "save_weights_for_sampler":
        which = draw(st.sampled_from(["name", "ttl", "checkpoint_type"]))
        args = {"name": "export"}
        if which == "name":
            args["name"] = draw(_not(str) | unsafe_names())
        elif which == "ttl":
            args["ttl"] = draw(_bad_ttl())
        else:
            args["checkpoint_type"] = draw(_not(str) | odd_text())
        return method, args
    if method == "resolve_checkpoint_path":
        if draw(st.booleans()):
            return method, {"name": draw(_not(str) | unsafe_names())}
        return method, {"name": "ok", "source_job_id": draw(_not(str) | unsafe_names())}
    if method == "create_training_client":
        which = draw(st.sampled_from(["base_model", "lora_rank", "lora_alpha", "seed"]))
        args = {"base_model": BASE_MODEL}
        if which == "base_model":
            args["base_model"] = draw(bad_str)
        elif which == "lora_rank":
            args["lora_rank"] = draw(st.sampled_from([-1, True, 1.5, "8", 2**70, None, [8]]))
        elif which == "lora_alpha":
            args.update(lora_rank=4, lora_alpha=draw(st.sampled_from([0, -3, 1.5, "x", 2**70])))
        else:
            args["seed"] = draw(st.sampled_from([1.5, "x", 2**70, [1]]))
        return method, args
    if method == "create_sampling_client":
        return method, {"model_path": draw(_not(str) | unsafe_names())}
    which = draw(st.sampled_from(["prompt", "num_samples", "params"]))
    args = {
        "prompt": tinker.ModelInput.from_ints([5, 6]),
        "num_samples": 1,
        "params": tinker.SamplingParams(max_tokens=2),
    }
    if which == "prompt":
        args["prompt"] = draw(st.sampled_from([None, [5, 6], "hi", 5]))
    elif which == "num_samples":
        args["num_samples"] = draw(st.sampled_from([0, -1, True, 1.5, "1", 2**70, 1 << 20]))
    else:
        args["params"] = draw(
            st.sampled_from(
                [
                    None,
                    {"max_tokens": 2},
                    ("temperature", -1.0),
                    ("temperature", math.nan),
                    ("max_tokens", -1),
                    ("top_p", 0.0),
                    ("top_p", 1.5),
                    ("top_k", -5),
                ]
            )
        )
    return method, args


def _invoke(
    service: FiretitanServiceClient,
    tc: FiretitanTrainingClient,
    sampler: Any,
    method: str,
    args: dict[str, Any],
) -> Any:
    """Make the call; return its future, or its value for a direct call."""
    if method in ("forward", "forward_backward"):
        return getattr(tc, method)(args["data"], args["loss_fn"], args.get("loss_fn_config"))
    if method == "optim_step":
        adam = args["adam"]
        if isinstance(adam, tuple):  # one field set out of its range
            adam = tinker.AdamParams.model_construct(
                **{**tinker.AdamParams().model_dump(), adam[0]: adam[1]}
            )
        return tc.optim_step(adam, args.get("norm"))
    if method == "save_state":
        return tc.save_state(args["name"], args.get("ttl"))
    if method in ("load_state", "load_state_with_optimizer"):
        return getattr(tc, method)(args["path"])
    if method == "save_weights_for_sampler":
        return tc.save_weights_for_sampler(
            args["name"], args.get("ttl"), checkpoint_type=args.get("checkpoint_type")
        )
    if method == "resolve_checkpoint_path":
        return tc.resolve_checkpoint_path(args["name"], args.get("source_job_id"))
    if method == "create_training_client":
        return service.create_training_client(**args)
    if method == "create_sampling_client":
        return service.create_sampling_client(model_path=args["model_path"])
    params = args["params"]
    if isinstance(params, tuple):
        params = tinker.SamplingParams.model_construct(
            **{**tinker.SamplingParams(max_tokens=2).model_dump(), params[0]: params[1]}
        )
    return sampler.sample(args["prompt"], args["num_samples"], params)


#: What a refused client call may raise: a firetitan error, or the builtin argument
#: errors (pydantic's ValidationError is a ValueError).
TYPED = (FiretitanError, ValueError, TypeError)


def _check_client_call(
    service: FiretitanServiceClient,
    tc: FiretitanTrainingClient,
    sampler: Any,
    call: tuple[str, dict[str, Any]],
    tally: collections.Counter[str],
) -> None:
    method, args = call
    try:
        if method == "forward" or method == "forward_backward":
            data = args["data"]
            if isinstance(data, list) and data and callable(data[0]):
                args = {**args, "data": [build() for build in data]}
        returned = _invoke(service, tc, sampler, method, args)
    except TYPED as exc:
        assert str(exc) and "Traceback" not in str(exc), (call, exc)
        tally[f"{method}: raised {type(exc).__name__}"] += 1
        return
    result = getattr(returned, "result", None)
    assert callable(result), ("hostile arguments were accepted", call, returned)
    try:
        value = result(timeout=60)
    except FutureTimeoutError as exc:  # a hang, caught by the bound
        raise AssertionError(("the call did not finish", call)) from exc
    except TYPED as exc:
        assert str(exc) and "Traceback" not in str(exc), (call, exc)
        tally[f"{method}: future failed with {type(exc).__name__}"] += 1
        return
    raise AssertionError(("hostile arguments ran successfully", call, value))


@pytest.mark.parametrize(
    "scale",
    scales(short={"cases": 150, "check_every": 50}, long={"cases": 800, "check_every": 200}),
)
def test_client_refuses_hostile_arguments_with_typed_errors(
    scale: Scale, tmp_path: Path, figures: Figures
) -> None:
    with (
        LocalTrainer(
            "torch", size="tiny", device="cpu", checkpoint_dir=tmp_path, **FAST_TRAINER
        ) as trainer,
        FiretitanServiceClient(
            base_url=trainer.base_url, api_key=trainer.api_key, config=QUICK_CLIENT
        ) as service,
    ):
        tc = service.create_training_client(BASE_MODEL)
        tc.forward_backward(GOOD_DATA, "cross_entropy").result()
        tc.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
        sampler = service.create_sampling_client(base_model=BASE_MODEL)
        digests = 0

        def state() -> tuple[str, Any]:
            nonlocal digests
            digests += 1
            tc.save_state(f"digest-{digests}").result()
            assert trainer.checkpoint_dir is not None
            folder = trainer.checkpoint_dir / trainer.job_id / "state" / f"digest-{digests}"
            sha = hashlib.sha256()
            for path in sorted(folder.glob("*.safetensors")):
                sha.update(path.read_bytes())
            out = tc.forward(GOOD_DATA, "cross_entropy").result()
            return sha.hexdigest()[:16], out.loss_fn_outputs[0]["logprobs"].tolist()

        before = state()
        tally: collections.Counter[str] = collections.Counter()
        count = 0

        @fuzz_settings(scale.cases, scale)
        @given(call=client_calls())
        def fuzz(call: tuple[str, dict[str, Any]]) -> None:
            nonlocal count
            _check_client_call(service, tc, sampler, call, tally)
            count += 1
            if count % scale.check_every == 0:
                assert state() == before

        fuzz()
        # The client is not poisoned, and the model is exactly where it was.
        assert state() == before
        assert sum(tally.values()) == count
    figures.record(
        f"fuzz: client arguments ({scale.name})",
        engine="torch",
        cases=count,
        raised_at_call=sum(n for k, n in tally.items() if "raised" in k),
        failed_through_future=sum(n for k, n in tally.items() if "future" in k),
        error_types=dict(collections.Counter(k.split(" ")[-1] for k in tally.elements())),
        successes=0,
        state_digest_unchanged=before[0],
    )


@pytest.mark.asyncio
async def test_a_refused_call_does_not_spoil_the_next_one() -> None:
    """The trainer refuses a call (400) and remembers its seq_id as a hole; the client
    gives that seq_id to its next call. The next call must run, not fail as "arrived
    after the trainer moved on" (a race the fuzz test above found)."""
    async with (
        LocalTrainer("null", **FAST_TRAINER) as trainer,
        local_model(trainer) as tc,
    ):
        for attempt in range(3):
            refused = tc.forward_backward([_datum([2**40, 5], np.array([5, 6]))], "cross_entropy")
            with pytest.raises(BadRequestError, match="out of range"):
                await refused
            await asyncio.sleep(0.1)  # the trainer's queue has seen the refusal by now
            await tc.save_state(f"after-refusal-{attempt}")
            await tc.optim_step(tinker.AdamParams(learning_rate=1e-3))
        assert [s for s, _ in ordered_log(trainer.execution_log, tc.model_id)] == [1, 2, 3, 4, 5, 6]
