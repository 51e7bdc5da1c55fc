"""P7 and P8: clean shutdown (explicit, or at interpreter exit) and fork safety."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

from firetitan import (
    ClientClosedError,
    ClientUsageError,
    FiretitanServiceClient,
    FiretitanTrainingClient,
)
from firetitan._portal import Portal, get_portal
from firetitan.local import LocalTrainer

from .conftest import BASE_MODEL, datum

EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, os, threading

    def report():
        # Registered before firetitan starts, so it runs after firetitan's exit hook.
        alive = [t.name for t in threading.enumerate() if t.name == "firetitan-loop"]
        print("loop threads after exit hook:", alive, flush=True)

    atexit.register(report)

    import numpy as np
    import tinker
    from firetitan import FiretitanServiceClient

    tokens = np.arange(1, 9, dtype=np.int64)
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tinker.TensorData.from_numpy(tokens[1:])},
    )
    service = FiretitanServiceClient(base_url=os.environ["URL"], api_key=os.environ["KEY"])
    tc = service.create_training_client(base_model=os.environ["MODEL"], lora_rank=0)
    tc.forward([datum], "cross_entropy").result()
    sampler = tc.save_weights_and_get_sampling_client()   # a second closable client
    in_flight = tc.forward_backward([datum], "cross_entropy")  # still pending at exit
    if os.environ["CLOSE"] == "yes":
        in_flight.result()
        service.close()
    print("leaving", flush=True)
    """
)


@pytest.mark.parametrize("close", ["yes", "no"], ids=["closed", "left-open"])
def test_exit_is_clean(trainer: LocalTrainer, close: str) -> None:
    env = {
        **os.environ,
        "URL": trainer.base_url,
        "KEY": trainer.api_key,
        "MODEL": BASE_MODEL,
        "CLOSE": close,
        # Show every warning, ResourceWarning ("Unclosed client session") included.
        "PYTHONWARNINGS": "default",
    }
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "leaving" in done.stdout
    assert "loop threads after exit hook: []" in done.stdout


def test_close_and_context_manager_are_clean(trainer: LocalTrainer) -> None:
    with FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key) as service:
        assert service.session_id  # the constructor connected
        tc = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        tc.forward([datum()], "cross_entropy").result()
    assert service.closed
    service.close()  # closing again does nothing
    with pytest.raises(ClientClosedError):
        tc.forward([datum()], "cross_entropy").result()


def test_portal_shutdown_closes_clients_and_joins_the_thread() -> None:
    from facade.toykit._async.service import AsyncToyService

    portal = Portal()  # a private portal, so that the process-wide one stays up
    service = portal.open(AsyncToyService, "http://toy.invalid")
    portal.call(service.create_training_client, "doomed")
    portal.shutdown()
    assert service.closed
    assert not portal._thread.is_alive()
    assert portal.loop.is_closed()
    with pytest.raises(ClientClosedError):
        portal.call(service.current_user)
    assert portal.close(service.aclose) is None  # closing after shutdown does nothing
    portal.shutdown()  # idempotent


def _child(
    training: FiretitanTrainingClient,
    pending: Any,
    url: str,
    key: str,
    results: Any,
) -> None:
    outcome: dict[str, str] = {}
    for name, attempt in (
        ("inherited call", lambda: training.forward([datum()], "cross_entropy")),
        ("inherited blocking call", training.list_checkpoints),
        ("inherited pending future", pending.result),
    ):
        try:
            attempt()
            outcome[name] = "no error"
        except ClientUsageError as exc:
            outcome[name] = f"ClientUsageError: {exc}"
        except BaseException as exc:
            outcome[name] = f"{type(exc).__name__}: {exc}"
    try:
        with FiretitanServiceClient(base_url=url, api_key=key) as fresh:
            tc = fresh.create_training_client(base_model=BASE_MODEL, lora_rank=0)
            out = tc.forward([datum()], "cross_entropy").result(30)
            outcome["fresh client"] = f"ok {len(out.loss_fn_outputs)}"
    except BaseException as exc:
        outcome["fresh client"] = f"{type(exc).__name__}: {exc}"
    results.put(outcome)


def test_forked_child_gets_a_fresh_portal_and_clear_errors(
    trainer: LocalTrainer, toy_service: Any, training: FiretitanTrainingClient
) -> None:
    training.forward([datum()], "cross_entropy").result()  # the parent's portal is running
    pending = toy_service.create_training_client("fork").step("pending", delay=30)
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    child = context.Process(
        target=_child, args=(training, pending, trainer.base_url, trainer.api_key, results)
    )
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0
    outcome = results.get()
    for name in ("inherited call", "inherited blocking call", "inherited pending future"):
        assert outcome[name].startswith("ClientUsageError:"), outcome
        assert "forked" in outcome[name]
    assert outcome["fresh client"] == "ok 1"
    # The parent is unaffected.
    assert training.forward([datum()], "cross_entropy").result() is not None
    pending.cancel()
    assert threading.current_thread() is threading.main_thread()
    assert get_portal().pid == os.getpid()
