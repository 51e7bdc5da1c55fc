"""The facade future (`APIFuture`) and the conversions the facade performs."""

from __future__ import annotations

import concurrent.futures
import pickle
from typing import Any

import pytest
import tinker

from firetitan import (
    APIFuture,
    FiretitanServiceClient,
    FiretitanTrainingClient,
    SamplingClient,
)
from firetitan.local import LocalTrainer

from .conftest import datum, wait_until


def test_future_api_on_a_real_request(training: FiretitanTrainingClient) -> None:
    fut = training.forward([datum()], "cross_entropy")
    assert isinstance(fut, APIFuture)
    out = fut.result(timeout=30)
    assert fut.done() and not fut.cancelled()
    assert fut.exception() is None
    assert fut.request_id is not None and fut.request_id in repr(fut)
    assert "finished" in repr(fut)
    assert not fut.cancel()  # too late
    assert fut.future().result() is out


def test_errors_surface_through_the_future(toy_service: Any) -> None:
    tc = toy_service.create_training_client("errors")
    failed = tc.fail("no good")
    with pytest.raises(ValueError, match="no good"):
        failed.result(10)
    assert isinstance(failed.exception(), ValueError)
    assert "failed: ValueError" in repr(failed)
    # An error the RPC method raises at once also arrives through the future, because
    # the facade returns before the loop has made the call...
    invalid = tc.fail("")
    with pytest.raises(ValueError, match="must not be empty"):
        invalid.result(10)
    # ...unless the method has an argument check, which the facade runs at the call.
    with pytest.raises(TypeError, match="text must be a string"):
        tc.echo(42)
    assert tc.echo("fine").result(10) == "fine"


def test_concurrent_futures_interoperate(training: FiretitanTrainingClient) -> None:
    futs = [training.forward([datum(offset=i)], "cross_entropy") for i in range(1, 6)]
    done, pending = concurrent.futures.wait([f.future() for f in futs], timeout=30)
    assert len(done) == 5 and not pending
    ordered = list(concurrent.futures.as_completed([f.future() for f in futs], timeout=30))
    assert len(ordered) == 5


def test_futures_of_async_objects_are_wrapped(toy: Any, toy_service: Any) -> None:
    tc = toy_service.create_training_client("parent")
    child = tc.child("kid").result(10)
    assert isinstance(child, toy.ToyTraining)
    assert child.step("from-kid").result(10) == "from-kid"
    assert "from-kid" in tc.log  # shares the parent's log, through the async object
    assert tc.peer(child) == "kid"  # facade twins passed as arguments are unwrapped
    assert tc.peer() == "parent"
    found = toy_service.find("parent")
    assert isinstance(found, toy.ToyTraining) and found.name == "parent"
    assert toy_service.find("nobody") is None
    assert [c.name for c in toy_service.clients()] == ["parent"]


def test_async_method_returning_a_future(toy_service: Any) -> None:
    tc = toy_service.create_training_client("custom")
    fut = tc.custom("late")
    assert isinstance(fut, APIFuture)
    assert fut.result(10) == "late"


def test_context_manager_entry_does_not_reconnect(toy: Any) -> None:
    with toy.ToyService("http://toy.invalid") as service:
        assert service._inner.opened == 1  # the constructor opened it; `with` reuses that
        assert service.resolve("a", job="j") == "cross_job://j/a"
        assert toy.ToyService.version() == "1.0"
    assert service._inner.closed


def test_failed_opening_closes_the_half_open_client(toy: Any) -> None:
    with pytest.raises(ConnectionError, match="refused"):
        toy.ToyService("http://toy.invalid", fail_open=True)


def test_sampling_client_survives_pickling(
    trainer: LocalTrainer, training: FiretitanTrainingClient
) -> None:
    sampler = training.save_weights_and_get_sampling_client()
    assert isinstance(sampler, SamplingClient)
    clone = pickle.loads(pickle.dumps(sampler))
    assert isinstance(clone, SamplingClient)
    assert clone.model_path == sampler.model_path
    clone.set_api_key(trainer.api_key)  # pickles never carry the key
    prompt = tinker.ModelInput.from_ints([1, 2, 3])
    params = tinker.SamplingParams(max_tokens=4, seed=1)
    response = clone.sample(prompt, 2, params).result(30)
    assert len(response.sequences) == 2
    clone.close()


def test_clients_holding_connections_refuse_pickling(
    service: FiretitanServiceClient, training: FiretitanTrainingClient
) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(service)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(training)


def test_unclosed_standalone_clients_are_tracked_for_exit(toy_service: Any) -> None:
    from firetitan._portal import get_portal

    tracked = list(get_portal()._clients.values())
    assert toy_service._inner in tracked
    toy_service.close()
    wait_until(lambda: toy_service._inner not in list(get_portal()._clients.values()))
