"""Client configuration: timeouts, the retry policy and limits.

All three are attrs frozen value types, validated when built; derive variants with
``attrs.evolve`` (or `ClientConfig.evolve`). One `ClientConfig` belongs to a service
client and everything created from it (training and sampling clients share it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from attrs import validators as v

__all__ = [
    "ClientConfig",
    "DeploymentConfig",
    "Limits",
    "RetryPolicy",
    "Timeouts",
    "resolve_api_key",
    "resolve_base_url",
]


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number, got {value!r}")


def _positive_or_none(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _positive(inst, attribute, value)


def _fraction(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


_POSITIVE_INT = [v.instance_of(int), v.ge(1)]


def _positive_int_or_none(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name} must be a positive integer or None, got {value!r}")


@attrs.frozen(kw_only=True)
class Timeouts:
    """Per-request time limits, in seconds.

    Attributes:
        connect: Establishing a TCP (and TLS) connection.
        request: One submission or direct request, from sending to the last byte of
            the answer. A timed-out request is retried (with the same idempotency key).
        long_poll_read: One ``retrieve_future`` long-poll. The trainer holds a poll
            for about 25 s, so this must stay well above that.
        heartbeat: One session heartbeat.
    """

    connect: float = attrs.field(default=5.0, validator=_positive)
    request: float = attrs.field(default=60.0, validator=_positive)
    long_poll_read: float = attrs.field(default=45.0, validator=_positive)
    heartbeat: float = attrs.field(default=10.0, validator=_positive)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How the transport retries one request (the only retrying layer).

    Retried: connection errors and timeouts, 408, 409, 429 and 5xx answers, and any
    answer carrying ``x-should-retry: true``; never an answer carrying
    ``x-should-retry: false``.

    Attributes:
        max_attempts: Attempts per request, the first included.
        initial_backoff: Delay before the first retry.
        max_backoff: Cap on the exponential delay.
        jitter: Random fraction taken off each delay (0 disables jitter), so that many
            clients recovering from one outage do not retry in lockstep.
        deadline: Overall seconds for one request and all its retries; no retry starts
            after it.
        max_retry_after: Cap on a trainer's ``Retry-After``.
        first_contact_deadline: Overall seconds for which the first request of a
            client retries a refused connection or a host name that does not resolve,
            instead of ``deadline``. Before the trainer has ever answered, these almost
            always mean a wrong ``base_url`` or a trainer that is not running, so the
            error comes in seconds and says what to check. Once it has answered, an
            outage is retried patiently (a trainer restarting mid-run).
        warn_after: A call still retrying after this many seconds logs one WARNING
            (each retry logs an INFO line).
    """

    max_attempts: int = attrs.field(default=10, validator=_POSITIVE_INT)
    initial_backoff: float = attrs.field(default=0.5, validator=_positive)
    max_backoff: float = attrs.field(default=10.0, validator=_positive)
    jitter: float = attrs.field(default=0.25, validator=_fraction)
    deadline: float = attrs.field(default=300.0, validator=_positive)
    max_retry_after: float = attrs.field(default=60.0, validator=_positive)
    first_contact_deadline: float = attrs.field(default=5.0, validator=_positive)
    warn_after: float = attrs.field(default=30.0, validator=_positive)

    def backoff(self, retry_number: int, rand: float) -> float:
        """Return the delay before retry ``retry_number`` (1-based).

        Args:
            retry_number: 1 for the first retry.
            rand: A uniform random number in [0, 1).
        """
        base = min(self.max_backoff, self.initial_backoff * 2 ** max(0, retry_number - 1))
        return float(base * (1.0 - self.jitter * rand))


@attrs.frozen(kw_only=True)
class Limits:
    """Resource limits.

    Attributes:
        max_connections: Connections in the submission pool (POSTs and GETs).
        max_poll_connections: Connections in the separate long-poll pool, so that
            pending long-polls can never starve submissions.
        max_polls_per_model: Concurrent long-polls per training client. A model runs
            its requests in order, so polling only the oldest few loses nothing.
        max_sample_polls: Concurrent long-polls per sampling client.
        max_concurrent_uploads: Concurrent chunk uploads per training client.
        max_chunk_datums: Datums per forward/forward_backward request (chunk).
        max_chunk_bytes: Estimated bytes per chunk.
        offload_bytes: Bodies estimated above this size are encoded and decoded in a
            worker thread so the event loop stays responsive. Measured: encoding a
            batch estimated at 100 kB takes about 1 ms (v2 float encoding), and the
            time grows linearly from there (about 90-175 ms at 10 MB).
        protobuf_result_bytes: Forward and forward_backward calls whose request is
            estimated above this size ask for their results as protobuf,
            which decodes in a fraction of the time JSON takes (measured: 0.1 ms instead
            of 6 ms for 32 × 2048 logprobs). A trainer may still answer JSON, which is
            read as usual. None always asks for JSON.
    """

    max_connections: int = attrs.field(default=64, validator=_POSITIVE_INT)
    max_poll_connections: int = attrs.field(default=64, validator=_POSITIVE_INT)
    max_polls_per_model: int = attrs.field(default=4, validator=_POSITIVE_INT)
    max_sample_polls: int = attrs.field(default=32, validator=_POSITIVE_INT)
    max_concurrent_uploads: int = attrs.field(default=16, validator=_POSITIVE_INT)
    max_chunk_datums: int = attrs.field(default=1024, validator=_POSITIVE_INT)
    max_chunk_bytes: int = attrs.field(default=5_000_000, validator=_POSITIVE_INT)
    offload_bytes: int = attrs.field(default=100_000, validator=_POSITIVE_INT)
    protobuf_result_bytes: int | None = attrs.field(
        default=100_000, validator=_positive_int_or_none
    )


@attrs.frozen(kw_only=True)
class ClientConfig:
    """Everything a service client and its children are configured with.

    Attributes:
        timeouts: Per-request time limits.
        retry: The retry policy for every request.
        limits: Pool sizes, poll concurrency and chunking.
        future_deadline: Default seconds from submission after which an unresolved
            future fails with `FutureTimeoutError` (None: no deadline). Each RPC method
            takes a ``deadline=`` override.
        heartbeat_interval: Seconds between session heartbeats.
        on_queue_state: Called as ``on_queue_state(state, reason)`` each time a trainer
            reports that its queue changed state while a future waits (``state``:
            ``"paused_rate_limit"``, ``"paused_capacity"``, ..., and ``"active"``
            again; ``reason``: the trainer's ``queue_state_reason``, or None), on the
            event loop: keep it short. Each change is also logged once, with the
            reason (logger ``firetitan``). A configuration holding a callback pickles
            only if the callback does.
    """

    timeouts: Timeouts = attrs.field(factory=Timeouts, validator=v.instance_of(Timeouts))
    retry: RetryPolicy = attrs.field(factory=RetryPolicy, validator=v.instance_of(RetryPolicy))
    limits: Limits = attrs.field(factory=Limits, validator=v.instance_of(Limits))
    future_deadline: float | None = attrs.field(default=7200.0, validator=_positive_or_none)
    heartbeat_interval: float = attrs.field(default=10.0, validator=_positive)
    on_queue_state: Callable[[str, str | None], None] | None = attrs.field(
        default=None, validator=v.optional(v.is_callable())
    )

    def evolve(self, **changes: Any) -> ClientConfig:
        """Return a copy with ``changes`` applied (validated like the original).

        Raises:
            ValueError: A changed value is out of range.
            TypeError: An unknown field name.
        """
        return attrs.evolve(self, **changes)


@attrs.frozen(kw_only=True)
class DeploymentConfig:
    """Where rollouts are sampled: an inference deployment that hot-loads snapshots.

    Given to a service client (``deployment=``), it makes `create_sampling_client` and
    `save_weights_and_get_sampling_client` hot-load the snapshot into this deployment
    and sample from it; without one they sample on the trainer.

    Attributes:
        base_url: The deployment's origin for control plane, hot-load and inference
            (``https://api.fireworks.ai``, or a `firetitan.local.LocalDeployment`'s
            ``base_url``).
        deployment_id: The deployment's id (``accounts/<acct>/deployments/<id>``).
        account: The account id; None asks the control plane (the API key must belong
            to exactly one account).
        base_model: The model the deployment serves (sent as ``fireworks-model``);
            None uses the base model of the training client whose snapshot is loaded.
        tokenizer: A Hugging Face tokenizer name or local folder, for ``get_tokenizer()``
            and for stop token ids; None uses the trainer's.
        hot_load_timeout: Seconds a hot-load may take before `HotLoadTimeoutError`.
        poll_interval: The longest wait between two hot-load status polls (polls start
            fast and slow down to this).
        max_concurrency: Completions in flight at most; the limit halves on 429/503
            and grows back as requests succeed.
    """

    base_url: str = attrs.field(validator=v.instance_of(str))
    deployment_id: str = attrs.field(validator=v.and_(v.instance_of(str), v.min_len(1)))
    account: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    base_model: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    tokenizer: str | None = attrs.field(default=None, validator=v.optional(v.instance_of(str)))
    hot_load_timeout: float = attrs.field(default=600.0, validator=_positive)
    poll_interval: float = attrs.field(default=5.0, validator=_positive)
    max_concurrency: int = attrs.field(default=256, validator=_POSITIVE_INT)

    @base_url.validator
    def _check_url(self, _attribute: attrs.Attribute[Any], value: str) -> None:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")


BASE_URL_ENV = ("FIRETITAN_BASE_URL", "TINKER_BASE_URL")
API_KEY_ENV = ("FIRETITAN_API_KEY", "FIREWORKS_API_KEY", "TINKER_API_KEY")


def resolve_base_url(base_url: str | None) -> str:
    """Return ``base_url``, or the first of ``FIRETITAN_BASE_URL``/``TINKER_BASE_URL``.

    Raises:
        ValueError: None was given and neither variable is set.
    """
    return _given_or_env(
        base_url,
        BASE_URL_ENV,
        "no trainer URL: pass base_url= or set FIRETITAN_BASE_URL "
        "(for a local trainer, use firetitan.local.LocalTrainer().base_url)",
    )


def resolve_api_key(api_key: str | None) -> str:
    """Return ``api_key``, or the first of ``FIRETITAN_API_KEY``, ``FIREWORKS_API_KEY``
    and ``TINKER_API_KEY``.

    Raises:
        ValueError: None was given and none of the variables is set.
    """
    return _given_or_env(api_key, API_KEY_ENV, "no API key: pass api_key= or set FIRETITAN_API_KEY")


def _given_or_env(value: str | None, names: tuple[str, ...], missing: str) -> str:
    """``value``, else the first of the environment variables ``names`` that is set.

    Raises:
        ValueError: ``missing``, when neither is there.
    """
    if value:
        return value
    for name in names:
        found = os.environ.get(name)
        if found:
            return found
    raise ValueError(missing)
