"""When requests run: per-model ``seq_id`` order, deduplication, gaps, futures, results.

The server decodes a request, hands the executor a coroutine function that does the work
(``run``), and answers the client with the request id the executor returns. Invariants:

* **One engine thread.** Every engine call goes through `Executor.in_engine`, a
  single-worker thread pool, so engine calls are serialized (torch state needs no locks)
  and the event loop never computes.
* **Per-model order.** Each model has a queue keyed by ``seq_id`` and one drainer task
  that runs ``next_seq`` as soon as it is present. The model's first job is its creation,
  at ``seq_id`` 0, so every later request runs after the model exists.
* **Exactly once.** ``(model_id, seq_id)`` maps to one request id; a retried POST gets the
  same id back and does not run again, whatever its body. Other POSTs deduplicate on
  caller-chosen keys (``X-Idempotency-Key``, ``(session_id, model_seq_id)``, ...).
* **Gaps never deadlock** (wire.md §5.5). A missing ``seq_id`` is skipped at once when a
  higher request of a kind that the client only sends after every lower one was
  acknowledged or definitively failed (anything but forward/forward_backward chunks) is
  queued, when the server rejected that ``seq_id``'s POST and later work waits (until
  then a new request may still take that ``seq_id``), or after
  ``gap_wait_seconds`` with later work waiting. A request whose ``seq_id`` arrives
  after the queue moved past it fails with category ``user`` instead of running out of
  order.
* **Results in the encoding asked for.** A finished request keeps a `Result`: its
  outcome, encoded as JSON, or, for results that also have a protobuf form (tinker
  0.38 reads forward and sampling results only as protobuf), the result object and
  each encoding once made, so that every poll gets what its ``Accept`` header asks for.
* **Holding.** `hold` stops new work from starting (what runs finishes) until
  `release`; meanwhile polls of the requests that wait answer ``try_again`` with the
  hold's queue state and reason, as tinker's clients expect of a paused trainer.
* **Bounded memory.** Finished results stay for ``result_retention_seconds``, at most
  ``max_retained_results`` of them and ``max_retained_result_bytes`` in all (oldest
  evicted first, the newest always kept); an evicted result answers 410. Request ids carry a
  per-process nonce and a counter, so "evicted" is told apart from "never issued" (404)
  without remembering evicted ids.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import attrs

from firetitan import _wire
from firetitan.local.config import ServerConfig
from firetitan.local.engine import UserError

__all__ = [
    "Encoding",
    "ExecutionRecord",
    "Executor",
    "ExecutorClosedError",
    "OverloadedError",
    "RequestExpiredError",
    "Result",
    "Run",
    "SequenceLeadError",
    "UnknownModelError",
    "UnknownRequestError",
    "failure_result",
    "success_json",
    "success_result",
    "wait_event",
]

log = logging.getLogger("firetitan.local")

T = TypeVar("T")

#: How a ``retrieve_future`` answer is encoded.
Encoding = Literal["json", "protobuf"]

#: Chunks of one forward/forward_backward call are uploaded concurrently and may overtake
#: each other, so their arrival says nothing about lower seq_ids (wire.md §5.4).
CHUNK_KINDS = frozenset({"forward", "forward_backward"})

_MAX_ERROR_CHARS = 2000
#: What a request that a graceful stop cancels, or refuses, is told.
SHUTTING_DOWN = "the trainer is shutting down"


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set, for at most ``seconds``; return whether it is set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


class UnknownRequestError(LookupError):
    """No request with this id was ever issued by this trainer (404)."""


class RequestExpiredError(LookupError):
    """The request's result was evicted (410)."""


class UnknownModelError(LookupError):
    """The model does not exist, or it was unloaded (404)."""


class SequenceLeadError(ValueError):
    """A ``seq_id`` implausibly far ahead of the model's next expected one (422)."""


class OverloadedError(RuntimeError):
    """Too many requests are pending (429)."""


class ExecutorClosedError(RuntimeError):
    """The trainer is shutting down (503)."""


@attrs.frozen
class ExecutionRecord:
    """One request that actually ran (an entry of the execution log)."""

    model_id: str | None
    seq_id: int | None
    request_id: str
    kind: str


class Result:
    """A finished request's answer to ``retrieve_future``, in the encodings it offers.

    Every result offers JSON. One built with a protobuf encoder offers protobuf too;
    it keeps its result object so that either encoding can be made when a poll first
    asks for it. Each encoding is made at most once and kept, so re-polls get the same
    bytes. `encode` may run on any thread: make large encodings off the event loop.

    Args:
        value: The result object the encoders take.
        encoders: How to make each encoding's bytes from ``value``.
    """

    def __init__(self, value: Any, encoders: Mapping[Encoding, Callable[[Any], bytes]]) -> None:
        self._value = value
        self._encoders = dict(encoders)
        self._encoded: dict[Encoding, bytes] = {}

    @classmethod
    def of_json(cls, body: bytes) -> Result:
        """A result that only exists as JSON bytes."""
        result = cls(None, {})
        result._encoded["json"] = body
        return result

    @property
    def nbytes(self) -> int:
        """An estimate of the memory this result holds: its encodings, plus, while it
        keeps its result object for another encoding, that object (estimated as large
        as its first encoding)."""
        made = sum(len(b) for b in self._encoded.values())
        if self._encoders.keys() - self._encoded.keys() and self._encoded:
            made += min(len(b) for b in self._encoded.values())
        return made

    def offers(self, encoding: Encoding) -> bool:
        return encoding in self._encoded or encoding in self._encoders

    def cached(self, encoding: Encoding) -> bytes | None:
        """The encoding if it was already made."""
        return self._encoded.get(encoding)

    def encode(self, encoding: Encoding) -> bytes:
        """The result in ``encoding``, made now unless it was made before.

        Raises:
            KeyError: The result does not offer ``encoding``.
            Exception: Whatever the encoder raises (`firetitan._wire.WireError` for a
                result the protocol cannot express).
        """
        made = self._encoded.get(encoding)
        if made is None:
            # Two threads may race to make it; both make the same bytes, the first stays.
            made = self._encoded.setdefault(encoding, self._encoders[encoding](self._value))
        return made


#: Work for one request: runs on the event loop, does its computing through
#: `Executor.in_engine`, and returns its result.
Run = Callable[[], Awaitable[Result]]


def success_json(payload: Any) -> bytes:
    """Serialize a success payload as ``retrieve_future`` returns it in JSON."""
    return _wire.dumps(_wire.encode_future_outcome(_wire.FutureResult(payload)))


def success_result(payload: Any) -> Result:
    """A JSON-only success result.

    Called on the engine thread, so that large payloads are serialized off the event
    loop, once.
    """
    return Result.of_json(success_json(payload))


def failure_result(message: str, category: str, error_class: str | None) -> Result:
    """A failure outcome (``{"error", "category", "error_class"}``); always JSON."""
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 3] + "..."
    outcome = _wire.FutureFailed(error=message, category=category, error_class=error_class)
    return Result.of_json(_wire.dumps(_wire.encode_future_outcome(outcome)))


def _cancelled(job: _Job) -> Result:
    return failure_result(f"{job.kind} was cancelled by the client", "user", "Cancelled")


@attrs.define(eq=False)
class _Job:
    request_id: str
    kind: str
    model_id: str | None
    seq_id: int | None
    run: Run | None
    done: asyncio.Event = attrs.field(factory=asyncio.Event)
    result: Result | None = None
    completed_at: float = 0.0
    nbytes: int = 0  # of its result, as counted in Executor._retained_bytes
    # Where this job is registered for deduplication; undone when it is evicted.
    keys: list[Hashable] = attrs.field(factory=list)
    # Whether a poll has been answered with its result (a graceful stop waits for it).
    delivered: bool = False
    # Whether it has started running (a held executor reports only the others paused).
    started: bool = False
    # The task running an unordered job (what `Executor.cancel` cancels).
    task: asyncio.Task[None] | None = None


@attrs.define(eq=False)
class _ModelQueue:
    model_id: str
    next_seq: int = 0
    pending: dict[int, _Job] = attrs.field(factory=dict)
    seen: dict[int, str] = attrs.field(factory=dict)
    holes: set[int] = attrs.field(factory=set)
    wake: asyncio.Event = attrs.field(factory=asyncio.Event)
    gap_since: float | None = None
    closed: bool = False
    task: asyncio.Task[None] | None = None


class Executor:
    """Runs requests in order, exactly once, on one engine thread. See the module docs.

    All methods except `in_engine`'s work and `execution_log` must be called on the
    event loop that runs the server.
    """

    def __init__(self, config: ServerConfig, private_root: Path | None = None) -> None:
        self._config = config
        # Failure messages name checkpoints relative to this folder: a client never
        # learns where the trainer keeps its files.
        self._private_root = None if private_root is None else str(private_root)
        self._nonce = secrets.token_hex(4)
        self._counter = 0
        self._jobs: dict[str, _Job] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._retained_bytes = 0
        self._pending = 0
        self._models: dict[str, _ModelQueue] = {}
        self._keys: dict[Hashable, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="firetitan-engine"
        )
        # Bounded (see ServerConfig.max_execution_log_entries): a list would grow by
        # every request for the trainer's whole life.
        self._log: collections.deque[ExecutionRecord] = collections.deque(
            maxlen=config.max_execution_log_entries
        )
        self._log_file: IO[str] | None = None
        self._closed = False
        self._pool_closed = False
        # What a graceful stop left unfinished, and a signal that a poll got a result.
        self._stopped_jobs: list[_Job] = []
        self._delivery = asyncio.Event()
        # `hold`: the (queue_state, reason) polls report, and a signal that it ended.
        self._hold: tuple[str, str] | None = None
        self._unheld = asyncio.Event()
        self._unheld.set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the optional JSONL execution log."""
        path = self._config.execution_log_path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered: one small write per executed request, readable while running.
            self._log_file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def hold(self, queue_state: str, reason: str) -> None:
        """Start no new request until `release` (running ones finish); polls of the
        waiting requests answer ``try_again`` with ``queue_state`` and ``reason``."""
        self._hold = (queue_state, reason)
        self._unheld.clear()
        log.warning("queue held (%s): %s", queue_state, reason)

    def release(self) -> None:
        """End a `hold`: the waiting requests run, in order."""
        if self._hold is None:
            return
        self._hold = None
        self._unheld.set()
        for queue in self._models.values():
            queue.wake.set()
        log.warning("queue released")

    async def stop(self) -> None:
        """Refuse new work, fail every queued request with "the trainer is shutting
        down", and let running ones finish. Results stay retrievable."""
        if self._closed:
            return
        self._closed = True
        self.release()  # what a hold kept waiting fails below, or sees the executor closed
        self._stopped_jobs = [job for job in self._jobs.values() if job.result is None]
        for queue in list(self._models.values()):
            self._close_queue(queue, SHUTTING_DOWN, "server", "TrainerShuttingDown")
        waits = [q.task for q in self._models.values() if q.task is not None]
        await asyncio.gather(*waits, *self._tasks, return_exceptions=True)
        self._models.clear()

    async def delivered(self, within: float, idle: float) -> None:
        """Wait until polls have collected the outcome of everything `stop` found
        unfinished, for at most ``within`` seconds, and no longer than ``idle`` seconds
        without a poll collecting one (nobody is asking any more)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while any(not job.delivered for job in self._stopped_jobs):
            wait = min(idle, deadline - loop.time())
            if wait <= 0:
                return
            self._delivery.clear()
            if not await wait_event(self._delivery, wait):
                return

    async def close(self, final: Callable[[], None] | None = None) -> None:
        """`stop`, then run ``final`` (e.g. the engine's ``close``) on the engine thread
        and stop the thread."""
        if self._pool_closed:
            return
        self._pool_closed = True
        await self.stop()
        try:
            if final is not None:
                await asyncio.get_running_loop().run_in_executor(self._pool, final)
        finally:
            self._pool.shutdown(wait=True)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    @property
    def closed(self) -> bool:
        return self._closed

    def in_engine(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the engine thread (after everything submitted before it).

        Raises:
            ExecutorClosedError: The executor is closed.
        """
        try:
            return asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except RuntimeError as exc:  # the pool refuses work after shutdown
            raise ExecutorClosedError(SHUTTING_DOWN) from exc

    @property
    def execution_log(self) -> list[ExecutionRecord]:
        """A copy of the requests executed so far (the most recent
        ``max_execution_log_entries``), in execution order (thread-safe)."""
        return list(self._log)

    # ------------------------------------------------------------------ models

    def has_model(self, model_id: str) -> bool:
        return model_id in self._models

    def add_model(self, model_id: str, kind: str, run: Run) -> str:
        """Create a model's queue with its creation job at ``seq_id`` 0.

        Returns:
            The creation job's request id.

        Raises:
            ValueError: The model already has a queue.
            OverloadedError, ExecutorClosedError: As for `submit_ordered`.
        """
        if model_id in self._models:
            raise ValueError(f"model {model_id!r} already exists")
        job = self._new_job(kind, model_id, 0, run)
        queue = _ModelQueue(model_id)
        queue.pending[0] = job
        queue.seen[0] = job.request_id
        job.keys.append(("seq", model_id, 0))
        queue.task = asyncio.get_running_loop().create_task(
            self._drain(queue), name=f"firetitan-model-{model_id}"
        )
        self._models[model_id] = queue
        return job.request_id

    def submit_ordered(self, model_id: str, seq_id: int, kind: str, run: Run) -> str:
        """Queue a request of a model at its ``seq_id``; return its request id.

        A duplicate ``(model_id, seq_id)`` returns the first request's id and does not
        queue anything. A ``seq_id`` the queue has already moved past gets a request
        that fails at once (category ``user``).

        Raises:
            UnknownModelError: The model has no queue (never created, or unloaded).
            SequenceLeadError: ``seq_id`` is more than ``max_seq_id_lead`` ahead of the
                next expected one.
            OverloadedError: Too many requests are pending.
            ExecutorClosedError: The trainer is shutting down.
        """
        queue = self._queue(model_id)
        existing = queue.seen.get(seq_id)
        if existing is not None:
            return existing
        key = ("seq", model_id, seq_id)
        if seq_id < queue.next_seq:
            job = self._new_job(kind, model_id, seq_id, None)
            job.keys.append(key)
            queue.seen[seq_id] = job.request_id
            message = (
                f"seq_id {seq_id} of model {model_id!r} arrived after the trainer had "
                f"moved on to seq_id {queue.next_seq} (it was skipped as a gap, or its "
                "result expired); it was not executed"
            )
            self._finish(job, failure_result(message, "user", "SequenceError"))
            return job.request_id
        lead = self._config.max_seq_id_lead
        if seq_id - queue.next_seq > lead:
            raise SequenceLeadError(
                f"seq_id {seq_id} is more than {lead} ahead of the next expected seq_id "
                f"{queue.next_seq} of model {model_id!r} (the limit max_seq_id_lead)"
            )
        job = self._new_job(kind, model_id, seq_id, run)
        job.keys.append(key)
        queue.holes.discard(seq_id)
        queue.pending[seq_id] = job
        queue.seen[seq_id] = job.request_id
        queue.wake.set()
        return job.request_id

    def lookup_seq(self, model_id: str, seq_id: int) -> str | None:
        """The request id already accepted for ``(model_id, seq_id)``, if any."""
        if seq_id < 1:
            # seq_id 0 is the model's creation: an ordered request claiming it is
            # invalid, not a retry of the creation (it would be answered with the
            # creation's result).
            return None
        queue = self._models.get(model_id)
        return None if queue is None else queue.seen.get(seq_id)

    def skip_seq(self, model_id: str, seq_id: int) -> None:
        """Note that ``seq_id`` will never run (its POST was rejected), so the model's
        queue does not wait for it."""
        queue = self._models.get(model_id)
        if queue is None or seq_id in queue.seen or seq_id < queue.next_seq:
            return
        queue.holes.add(seq_id)
        queue.wake.set()

    async def close_model(self, model_id: str, reason: str) -> None:
        """Remove a model's queue: queued requests fail with ``reason`` (category
        ``user``), the running one finishes, and later requests get `UnknownModelError`.

        Must not be called from a job of the same model (it waits for that model's
        drainer).
        """
        queue = self._models.pop(model_id, None)
        if queue is None:
            return
        self._close_queue(queue, reason, "user")
        if queue.task is not None:
            await queue.task

    # ------------------------------------------------------------------ unordered

    def submit(
        self,
        kind: str,
        run: Run,
        *,
        keys: Sequence[Hashable] = (),
        model_id: str | None = None,
    ) -> str:
        """Start a request that is not ordered by ``seq_id``; return its request id.

        Args:
            kind: What it is (for the execution log).
            run: The work.
            keys: Deduplication keys: if any is already known, that request's id is
                returned and nothing runs.
            model_id: The model it concerns, for the execution log.

        Raises:
            OverloadedError, ExecutorClosedError: As for `submit_ordered`.
        """
        for key in keys:
            existing = self._keys.get(key)
            if existing is not None:
                return existing
        job = self._new_job(kind, model_id, None, run)
        for key in keys:
            self._keys[key] = job.request_id
            job.keys.append(key)
        task = asyncio.get_running_loop().create_task(self._execute(job))
        job.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job.request_id

    def cancel(self, request_id: str) -> bool:
        """Drop a request the client abandoned, unless it already ran.

        An ordered request still queued is removed and its ``seq_id`` skipped, so the
        model's later requests run. An unordered one (sampling) is cancelled: if the
        engine has not started it, it never runs; if it has, its result is discarded.
        Either way the request's future fails with category ``user``, so a retried
        poll learns what happened.

        Returns:
            True if the request was cancelled; False if it had finished, or is an
            ordered request that is running.

        Raises:
            UnknownRequestError, RequestExpiredError: As for `retrieve`.
        """
        job = self._job(request_id)
        if job.result is not None:
            return False
        if job.task is not None:
            job.task.cancel()
            self._finish(job, _cancelled(job))  # also when the task never got to start
            return True
        queue = self._models.get(job.model_id or "")
        if queue is None or job.seq_id is None or queue.pending.get(job.seq_id) is not job:
            return False  # running now
        del queue.pending[job.seq_id]
        queue.holes.add(job.seq_id)
        queue.wake.set()
        self._finish(job, _cancelled(job))
        return True

    def lookup(self, key: Hashable) -> str | None:
        """The request id registered under a deduplication key, if any."""
        return self._keys.get(key)

    # ------------------------------------------------------------------ futures

    async def retrieve(
        self, request_id: str, hold: float | None = None, encoding: Encoding = "json"
    ) -> tuple[bytes, Encoding]:
        """The ``retrieve_future`` answer for a request, long-polling while it is pending.

        Args:
            request_id: The id from the submission ACK.
            hold: Seconds to wait for completion; defaults to ``long_poll_seconds``.
            encoding: The encoding the poll asks for; results that do not offer it,
                failures and ``try_again`` are answered in JSON.

        Returns:
            The serialized outcome (result, failure, or ``try_again``) and its encoding.

        Raises:
            UnknownRequestError: The id was never issued here.
            RequestExpiredError: The result was evicted.
        """
        job = self._job(request_id)
        if not job.done.is_set():
            await wait_event(job.done, self._config.long_poll_seconds if hold is None else hold)
        if job.result is not None:
            answer = await self._encoded(job, job.result, encoding)
            job.delivered = True
            self._delivery.set()
            return answer
        state, reason = ("active", None) if self._hold is None or job.started else self._hold
        pending = _wire.TryAgain(request_id, queue_state=state, queue_state_reason=reason)
        return _wire.dumps(_wire.encode_future_outcome(pending)), "json"

    async def _encoded(self, job: _Job, result: Result, wanted: Encoding) -> tuple[bytes, Encoding]:
        encoding: Encoding = wanted if result.offers(wanted) else "json"
        made = result.cached(encoding)
        if made is not None:
            return made, encoding
        try:
            # Not the engine thread: encoding an old result must not wait behind compute.
            made = await asyncio.to_thread(result.encode, encoding)
            if job.request_id in self._finished:
                self._account(job, result)
            return made, encoding
        except Exception as exc:
            # The result passed the encoding made when it finished; this one refused it.
            log.debug("request %s: %s encoding failed", job.request_id, encoding, exc_info=True)
            message = f"the {job.kind} result cannot be sent as {encoding}: {exc}"
            failure = failure_result(message, "server", type(exc).__name__)
            return failure.encode("json"), "json"

    def evict_expired(self, now: float | None = None) -> int:
        """Drop finished results older than the retention time; return how many."""
        now = asyncio.get_running_loop().time() if now is None else now
        cutoff = now - self._config.result_retention_seconds
        count = 0
        while self._finished:
            oldest = next(iter(self._finished))
            if self._jobs[oldest].completed_at > cutoff:
                break
            self._evict(oldest)
            count += 1
        return count

    # ------------------------------------------------------------------ internals

    def _job(self, request_id: str) -> _Job:
        job = self._jobs.get(request_id)
        if job is None:
            if self._was_issued(request_id):
                config = self._config
                raise RequestExpiredError(
                    f"the result of request {request_id!r} is no longer kept; results are "
                    f"kept for {config.result_retention_seconds:g} s, at most "
                    f"{config.max_retained_results} of them and at most "
                    f"{config.max_retained_result_bytes} bytes in all (the oldest go first)"
                )
            raise UnknownRequestError(f"unknown request_id {request_id!r}")
        return job

    def _queue(self, model_id: str) -> _ModelQueue:
        queue = self._models.get(model_id)
        if queue is None:
            raise UnknownModelError(f"unknown model_id {model_id!r}")
        return queue

    def _new_job(
        self, kind: str, model_id: str | None, seq_id: int | None, run: Run | None
    ) -> _Job:
        if self._closed:
            raise ExecutorClosedError(SHUTTING_DOWN)
        if run is not None and self._pending >= self._config.max_pending_requests:
            raise OverloadedError(
                f"{self._pending} requests are pending; the limit is "
                f"{self._config.max_pending_requests}"
            )
        self._counter += 1
        job = _Job(f"req-{self._nonce}-{self._counter}", kind, model_id, seq_id, run)
        self._jobs[job.request_id] = job
        self._pending += 1
        return job

    def _was_issued(self, request_id: str) -> bool:
        prefix = f"req-{self._nonce}-"
        if not request_id.startswith(prefix):
            return False
        number = request_id[len(prefix) :]
        return number.isdigit() and 0 < int(number) <= self._counter

    async def _drain(self, queue: _ModelQueue) -> None:
        """Run a model's queue in seq_id order until it is closed."""
        loop = asyncio.get_running_loop()
        while not queue.closed:
            if self._hold is not None and queue.pending:
                # Held: the job stays queued (cancellable); `release` or news wakes us.
                queue.wake.clear()
                await queue.wake.wait()
                continue
            job = queue.pending.pop(queue.next_seq, None)
            if job is not None:
                queue.next_seq += 1
                queue.gap_since = None
                await self._execute(job)
                continue
            if queue.next_seq in queue.holes and queue.pending:
                # Skipped only once later work waits: a client may resend a refused
                # call's seq_id with its next call (firetitan's does), which then
                # fills the hole instead of arriving after the queue moved past it.
                queue.holes.discard(queue.next_seq)
                queue.next_seq += 1
                continue
            if not queue.pending:
                queue.gap_since = None
                queue.wake.clear()
                await queue.wake.wait()
                continue
            # A gap: next_seq is missing while later requests wait.
            lowest = min(queue.pending)
            if any(
                s > queue.next_seq and j.kind not in CHUNK_KINDS for s, j in queue.pending.items()
            ):
                self._skip_to(queue, lowest, "a later non-chunk request arrived")
                continue
            now = loop.time()
            if queue.gap_since is None:
                queue.gap_since = now
            remaining = queue.gap_since + self._config.gap_wait_seconds - now
            if remaining <= 0:
                self._skip_to(queue, lowest, f"waited {self._config.gap_wait_seconds:g} s")
                continue
            queue.wake.clear()
            await wait_event(queue.wake, remaining)

    def _skip_to(self, queue: _ModelQueue, seq_id: int, why: str) -> None:
        log.info(
            "model %s: skipping missing seq_id %d..%d (%s)",
            queue.model_id,
            queue.next_seq,
            seq_id - 1,
            why,
        )
        queue.holes = {h for h in queue.holes if h >= seq_id}
        queue.next_seq = seq_id
        queue.gap_since = None

    def _close_queue(
        self, queue: _ModelQueue, reason: str, category: str, error_class: str = "ModelUnloaded"
    ) -> None:
        queue.closed = True
        for job in queue.pending.values():
            self._finish(job, failure_result(reason, category, error_class))
        queue.pending.clear()
        queue.wake.set()

    async def _execute(self, job: _Job) -> None:
        if self._hold is not None and job.seq_id is None:
            await self._unheld.wait()  # an unordered job (sampling) waits out a hold here
            if self._closed:
                self._finish(job, failure_result(SHUTTING_DOWN, "server", "TrainerShuttingDown"))
                return
        run = job.run
        if run is None or job.result is not None:
            return
        job.started = True
        self._record(job)
        started = time.monotonic()
        try:
            result = await run()
        except (UserError, _wire.WireError) as exc:
            result = failure_result(self._redact(str(exc)), "user", type(exc).__name__)
        except asyncio.CancelledError:  # `cancel`: the client abandoned it
            self._finish(job, _cancelled(job))
            raise
        except Exception as exc:
            # The client gets what failed, never a traceback; the traceback stays here.
            log.debug("request %s (%s) failed", job.request_id, job.kind, exc_info=True)
            log.warning("request %s (%s) failed: %s", job.request_id, job.kind, type(exc).__name__)
            message = f"{job.kind} failed on the trainer: {type(exc).__name__}: {exc}"
            result = failure_result(self._redact(message), "server", type(exc).__name__)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "ran %s (model %s, seq %s, request %s) in %.1f ms",
                job.kind,
                job.model_id,
                job.seq_id,
                job.request_id,
                1e3 * (time.monotonic() - started),
            )
        self._finish(job, result)

    def _redact(self, message: str) -> str:
        root = self._private_root
        if root is None:
            return message
        return message.replace(root + os.sep, "").replace(root, "<checkpoint root>")

    def _record(self, job: _Job) -> None:
        record = ExecutionRecord(job.model_id, job.seq_id, job.request_id, job.kind)
        self._log.append(record)
        if self._log_file is not None:
            self._log_file.write(json.dumps(attrs.asdict(record)) + "\n")

    def _finish(self, job: _Job, result: Result) -> None:
        if job.result is not None:
            return
        job.result = result
        job.run = None  # drop the closure, and with it the decoded request data
        job.completed_at = asyncio.get_running_loop().time()
        self._pending -= 1
        self._finished[job.request_id] = None
        job.done.set()
        self._account(job, result)

    def _account(self, job: _Job, result: Result) -> None:
        """Count a finished job's result (again, after it made another encoding), then
        evict the oldest results beyond the count and byte limits. The newest result
        stays whatever its size: evicting it would only turn its poll into a 410."""
        size = result.nbytes
        self._retained_bytes += size - job.nbytes
        job.nbytes = size
        config = self._config
        while len(self._finished) > 1 and (
            len(self._finished) > config.max_retained_results
            or self._retained_bytes > config.max_retained_result_bytes
        ):
            self._evict(next(iter(self._finished)))

    def _evict(self, request_id: str) -> None:
        self._finished.pop(request_id, None)
        job = self._jobs.pop(request_id, None)
        if job is None:
            return
        self._retained_bytes -= job.nbytes
        for key in job.keys:
            if isinstance(key, tuple) and len(key) == 3 and key[0] == "seq":
                queue = self._models.get(key[1])
                if queue is not None and queue.seen.get(key[2]) == request_id:
                    del queue.seen[key[2]]
            elif self._keys.get(key) == request_id:
                del self._keys[key]
