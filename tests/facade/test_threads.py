"""P4 and P9: one client shared by threads keeps each thread's call order and loses
nothing; the caller's contextvars reach the loop."""

from __future__ import annotations

import threading
from typing import Any

import tinker

from firetitan import APIFuture, FiretitanTrainingClient
from firetitan._portal import get_portal
from firetitan.local import LocalTrainer

from .conftest import datum

THREADS = 8
CALLS = 12


def test_eight_threads_keep_per_thread_order_and_lose_nothing(
    trainer: LocalTrainer, training: FiretitanTrainingClient
) -> None:
    start = threading.Barrier(THREADS)
    issued: dict[int, list[APIFuture[tinker.ForwardBackwardOutput]]] = {}

    def worker(index: int) -> None:
        start.wait()
        issued[index] = [
            training.forward_backward([datum(offset=index * 40 + call)], "cross_entropy")
            for call in range(CALLS)
        ]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(issued) == THREADS
    # A call made after every thread finished runs after all of them.
    last = training.optim_step(tinker.AdamParams(learning_rate=1e-5))

    for futures in issued.values():
        for fut in futures:
            assert fut.result(30).metrics
    last.result(30)

    log = [
        r
        for r in trainer.execution_log
        if r.model_id == training.model_id and r.kind != "create_model"
    ]
    position = {record.request_id: index for index, record in enumerate(log)}
    assert len(position) == len(log), "a request executed twice"
    for index, futures in issued.items():
        ids = [fut.request_id for fut in futures]
        assert all(rid in position for rid in ids), f"thread {index} lost a call"
        order = [position[rid] for rid in ids if rid is not None]
        assert order == sorted(order), f"thread {index}'s calls ran out of order"
    assert len(log) == THREADS * CALLS + 1
    assert log[-1].kind == "optim_step"
    assert [r.seq_id for r in log] == list(range(1, len(log) + 1))


def test_contextvars_reach_the_loop_on_every_path(toy_service: Any) -> None:
    from facade.toykit._async.service import USER

    tc = toy_service.create_training_client("ctx")
    seen: dict[str, tuple[str, str]] = {}

    def as_user(name: str) -> None:
        USER.set(name)
        called = toy_service.current_user()  # Portal.call
        tc.step(name).result(10)  # Portal.start: the RPC method records USER.get()
        submitted = get_portal().submit(toy_service._inner.current_user).result(10)
        seen[name] = (called, submitted)

    threads = [threading.Thread(target=as_user, args=(n,)) for n in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert seen == {"alice": ("alice", "alice"), "bob": ("bob", "bob")}
    assert sorted(tc._inner.users) == ["alice", "bob"]
    assert USER.get() == "anonymous"  # this thread's context is untouched
