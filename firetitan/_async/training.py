"""`AsyncFiretitanTrainingClient`: one trainable model on a trainer.

RPC methods validate their arguments, put a `Call` on the model's `OrderedQueue`
(``ordering.py``: call order, seq_ids, pipelining, failed submissions) and return an
`AsyncAPIFuture` at once.

``forward_backward_custom`` enqueues its forward and, right behind it, a gated
placeholder for its backward. The queue stops at the placeholder until the user's
loss has run on the forward's logprobs, so an ``optim_step`` called right after is
ordered after the backward and the parameters cannot change between the two passes.
Whatever ends the custom call (its loss raising, the forward failing, cancellation,
the deadline, closing), the gate is opened or dropped, so the queue never stalls on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import numpy as np
import tinker
from tinker import types as ttypes

from firetitan import _checkpoint_paths, _wire
from firetitan._async import custom_loss
from firetitan._async._checks import non_empty_str, one_of, positive_int, string_map
from firetitan._async._rpc import Start, rpc
from firetitan._async._tasks import TaskSet
from firetitan._async.async_future import AsyncAPIFuture, FutureState, resolve_deadline
from firetitan._async.deployment import AsyncDeployment
from firetitan._async.ordering import (
    JSON,
    Call,
    OrderedQueue,
    ack_request_id,
    failed_bodies,
    template,
    templates,
    unfilled,
)
from firetitan._async.polling import Poller
from firetitan._async.sampling import AsyncSamplingClient
from firetitan._errors import (
    ClientClosedError,
)
from firetitan._read_only import ReadOnly
from firetitan._transport import ProtobufBody, Transport, decode_result
from firetitan._types import GradAccNormalization, SaveSamplerResult
from firetitan._unpicklable import Unpicklable
from firetitan._wire import endpoints

__all__ = ["AsyncFiretitanTrainingClient", "Parent"]

log = logging.getLogger("firetitan")

R = TypeVar("R")

_CHECKPOINT_TYPES = ("base", "delta", "merged_base")
# Rough JSON size of one number in a request body; used to decide off-loop encoding.
_BYTES_PER_NUMBER = 10
#: A large batch of a model with nothing in flight is encoded on the loop up to this many
#: times `Limits.offload_bytes` (estimated): a few milliseconds of encoding, short
#: enough not to hold up other clients' polls on a shared loop.
_INLINE_WHEN_IDLE = 32


class Parent(Protocol):
    """What a training client asks of the service client that created it.

    Named here, so that this module does not import the service client's.
    """

    @property
    def deployment(self) -> AsyncDeployment | None: ...

    def _check_open(self) -> None: ...

    def _forget(self, client: AsyncFiretitanTrainingClient) -> None: ...

    async def _tokenizer_for(self, client: AsyncFiretitanTrainingClient | None) -> Any: ...

    async def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> AsyncSamplingClient: ...


class AsyncFiretitanTrainingClient(Unpicklable):
    """A trainable model on a trainer: forward/backward passes, optimizer steps,
    checkpoints and sampler exports.

    Created by `AsyncFiretitanServiceClient.create_training_client` (or its LoRA and
    base-only variants). RPC methods return an `AsyncAPIFuture` at once and run on the
    trainer in call order, pipelined: no call waits for an earlier result before it is
    sent. They must be called on the event loop that runs the service client.

    Invalid arguments (an empty batch, an unknown normalization, a dict for
    `tinker.AdamParams`, ...) raise ValueError or TypeError at the call, and a closed
    client ClientClosedError, before anything is sent, on the blocking facade exactly as
    here; what fails on the trainer arrives through the future. The coroutine methods
    (``save_weights_for_sampler_ext``, ``save_weights_and_get_sampling_client``) take
    their place in the call order when their coroutine starts running (awaited, or
    scheduled as a task), not when called.
    """

    _unpicklable = "a training client is bound to its service client and cannot be pickled"

    def __init__(
        self,
        *,
        service: Parent,
        transport: Transport,
        model_id: str,
        spec: _wire.ModelSpec,
        capabilities: Mapping[str, Any],
    ) -> None:
        self._service = service
        self._transport = transport
        self._config = transport.config
        self._model_id = model_id
        # What the model was created with (for a model loaded from a checkpoint: its
        # base model and rank, as the trainer describes it).
        self._spec = spec
        self._capabilities = dict(capabilities)
        self._comms = "v2" if capabilities.get("comms") == "v2" else None
        # Local snapshot-name suffix (wire.md §8.3), unrelated to the server session.
        self._session_suffix = secrets.token_hex(4)
        self._poller = Poller(transport, self._config.limits.max_polls_per_model)
        self._tasks = TaskSet(f"training client {model_id}")
        self._queue = OrderedQueue(
            transport, self._poller, self._tasks, self._config.limits.max_concurrent_uploads
        )
        self._live: set[AsyncAPIFuture[Any]] = set()
        self._closed_reason: str | None = None
        self._exports_ok = 0
        self._exports_pending = 0
        self._sampler_names = 0
        # The sampler-export chain as the trainer builds it: each finished base or delta
        # export's snapshot name -> the snapshot it is a delta on (None for a base). The
        # trainer diffs a delta against its previous base/delta export (merged_base
        # exports are not part of the chain), so that is what a deployment must hold
        # before it may load the delta.
        self._chain: dict[str, str | None] = {}
        self._chain_head: str | None = None

    # ------------------------------------------------------------------ properties

    model_id: ReadOnly[str] = ReadOnly("_model_id", "The trainer's id of this model.")

    base_model: ReadOnly[str] = ReadOnly(
        "_spec.base_model", "The base model name this model was created from."
    )

    lora_rank: ReadOnly[int] = ReadOnly(
        "_spec.lora_rank", "The LoRA rank; 0 for full-parameter training."
    )

    @property
    def is_lora(self) -> bool:
        """Whether this model trains a LoRA adapter."""
        return self._spec.lora_rank > 0

    base_only: ReadOnly[bool] = ReadOnly(
        "_spec.base_only", "Whether this is a frozen base model (forward only)."
    )

    session_id: ReadOnly[str] = ReadOnly(
        "_session_suffix",
        """The 8-hex suffix of this client's sampler snapshot names (local, not the
        server session).""",
    )

    comms: ReadOnly[str | None] = ReadOnly(
        "_comms", """The JSON encoding the trainer offered for this model (``"v2"`` or None)."""
    )

    @property
    def capabilities(self) -> dict[str, Any]:
        """The trainer's ``create_model`` answer (``model_id``, ``comms``,
        ``supports_*`` flags, ...)."""
        return dict(self._capabilities)

    def __repr__(self) -> str:
        return (
            f"<AsyncFiretitanTrainingClient model_id={self._model_id!r} "
            f"base_model={self.base_model!r} lora_rank={self.lora_rank}>"
        )

    # ------------------------------------------------------------------ passes

    def _pass(
        self,
        endpoint: endpoints.Endpoint[tinker.ForwardBackwardOutput],
        data: Sequence[tinker.Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None = None,
        *,
        deadline: float | None = None,
    ) -> Start[tinker.ForwardBackwardOutput]:
        # `forward` and `forward_backward`: the same arguments, another endpoint.
        self._check_open()
        _check_forward_args(data, loss_fn, loss_fn_config)
        resolved = self._resolve_deadline(deadline)
        loss = _Loss(loss_fn, None if loss_fn_config is None else dict(loss_fn_config))
        return lambda: self._forward_call(endpoint, data, loss, resolved)

    forward = rpc.partial(
        _pass,
        endpoints.FORWARD,
        doc="""Run a forward pass and compute the loss, without touching gradients.

        `forward_backward` without the backward pass: the same arguments, output
        (per-datum ``loss_fn_outputs`` with ``logprobs``, and ``metrics``) and errors.
        """,
    )

    forward_backward = rpc.partial(
        _pass,
        endpoints.FORWARD_BACKWARD,
        doc="""Run a forward and backward pass and accumulate the gradients.

        The gradients add up until the next `optim_step` consumes them.

        Args:
            data: The batch. Large batches are split into chunks automatically.
            loss_fn: A built-in loss: ``cross_entropy``, ``importance_sampling``,
                ``ppo``, ``cispo``, ``dro``, ...
            loss_fn_config: Options of the loss, e.g. clip thresholds.
            deadline: Seconds until the future fails with `FutureTimeoutError`;
                None uses the configuration's ``future_deadline``.

        Returns:
            A future for the output: per-datum ``loss_fn_outputs`` and ``metrics``
            (``loss:sum``; for ``cross_entropy`` also ``response_tokens``).

        Raises:
            ValueError: Empty data or invalid arguments (raised at once).
            TypeError: ``data`` is not a sequence of `tinker.Datum`.
            ClientClosedError: The client was closed or its model unloaded.
        """,
    )

    @rpc
    def forward_backward_custom(
        self,
        data: Sequence[tinker.Datum],
        loss_fn: custom_loss.CustomLossFn,
        precomputed_forward: tinker.ForwardBackwardOutput | None = None,
        *,
        deadline: float | None = None,
    ) -> Start[tinker.ForwardBackwardOutput]:
        """Train on a loss computed on the client from the model's logprobs.

        Runs ``forward`` with ``cross_entropy``, calls
        ``loss_fn(data, logprobs_list) -> (loss, metrics)`` on float32 torch tensors
        that require gradients (in a worker thread), then runs ``forward_backward``
        with ``weights = -dloss/dlogprobs``, which accumulates exactly the gradient of
        ``loss``. Calls made after this one run after its backward. Needs torch.

        Args:
            data: The batch; every datum needs ``target_tokens``. ``loss_fn`` receives
                these datums unchanged.
            loss_fn: The loss: returns a scalar torch tensor and a dict of metrics.
            precomputed_forward: The output of an earlier `forward` on exactly this
                data with unchanged weights; the forward pass is then skipped.
            deadline: Seconds until the future fails with `FutureTimeoutError`;
                None uses the configuration's ``future_deadline``.

        Returns:
            A future for the backward's output with the user's metrics merged in;
            ``metrics["loss"]`` is the user's loss unless the metrics name it, and
            ``loss:sum`` is the trainer's surrogate value.

        Raises:
            ValueError: A datum without ``target_tokens``, or a
                ``precomputed_forward`` that does not fit ``data`` (raised at once).
                Through the future: a logprob tensor that got no gradient, or a loss
                that is not a scalar tensor.
            TypeError: ``loss_fn`` is not callable.
            ClientClosedError: The client was closed or its model unloaded.
        """
        self._check_open()
        batch = _check_data(data)
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(data, logprobs_list)")
        if precomputed_forward is not None:
            custom_loss.check_precomputed(precomputed_forward, batch)
        else:
            custom_loss.check_targets(batch)
        resolved = self._resolve_deadline(deadline)
        return lambda: self._start_custom(batch, loss_fn, precomputed_forward, resolved)

    def _start_custom(
        self,
        batch: list[tinker.Datum],
        loss_fn: custom_loss.CustomLossFn,
        precomputed_forward: tinker.ForwardBackwardOutput | None,
        deadline: float | None,
    ) -> AsyncAPIFuture[tinker.ForwardBackwardOutput]:
        self._check_usable()
        forward_batch = None if precomputed_forward is not None else custom_loss.forward_data(batch)
        # The internal forward has no deadline of its own: the custom future's
        # deadline (or cancellation) ends it, through abandon() below.
        forward_future = (
            None
            if forward_batch is None
            else self._forward_call(endpoints.FORWARD, forward_batch, _CROSS_ENTROPY, None)
        )
        future: AsyncAPIFuture[tinker.ForwardBackwardOutput] = self._new_future(
            "forward_backward_custom", deadline
        )
        gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        backward = Call(
            endpoint=endpoints.FORWARD_BACKWARD,
            future=future,
            finish=unfilled,
            bodies=None,
            gate=gate,
        )
        self._enqueue(backward)
        driver = self._tasks.spawn(
            self._drive_custom(backward, gate, batch, loss_fn, forward_future, precomputed_forward),
            name="forward_backward_custom",
        )

        def abandon() -> None:
            # Whatever ended the custom future (result, failure, cancel, deadline), the
            # backward's gate must not stay closed, or it would stall the queue.
            if not gate.done():
                gate.set_result(False)
            if forward_future is not None:
                forward_future.cancel()
            driver.cancel()

        future._on_finish(abandon)
        return future

    async def _drive_custom(
        self,
        backward: Call,
        gate: asyncio.Future[bool],
        batch: list[tinker.Datum],
        loss_fn: custom_loss.CustomLossFn,
        forward_future: AsyncAPIFuture[tinker.ForwardBackwardOutput] | None,
        precomputed: tinker.ForwardBackwardOutput | None,
    ) -> None:
        future = backward.future
        try:
            output = precomputed if forward_future is None else await forward_future
            assert output is not None
            result = await asyncio.to_thread(custom_loss.run_user_loss, loss_fn, batch, output)
            linear = custom_loss.linearized_data(batch, result.grads)
            prepared = self._prepare_forward_bodies(backward.endpoint, linear, _CROSS_ENTROPY)
            tokens = _response_tokens(linear)

            async def finish(payloads: list[Any]) -> tinker.ForwardBackwardOutput:
                out = await _forward_output(
                    backward.endpoint, payloads, offload=prepared.offload, response_tokens=tokens
                )
                return custom_loss.merge_result(out, result)

            backward.bodies, backward.finish = prepared.bodies, finish
            backward.offload, backward.protobuf = prepared.offload, prepared.protobuf
            if not gate.done():
                gate.set_result(True)
        except Exception as exc:
            future._set_exception(exc)
        finally:
            if not gate.done():
                gate.set_result(False)

    # ------------------------------------------------------------------ optimizer

    @rpc
    def optim_step(
        self,
        adam_params: tinker.AdamParams,
        grad_accumulation_normalization: GradAccNormalization | str | None = None,
        *,
        deadline: float | None = None,
    ) -> Start[tinker.OptimStepResponse]:
        """Apply one AdamW step to the accumulated gradients, then zero them.

        Args:
            adam_params: Learning rate, betas, eps, weight decay, gradient clipping.
            grad_accumulation_normalization: Divide the accumulated gradient by the
                number of loss tokens (``"num_loss_tokens"``) or of sequences
                (``"num_sequences"``) first; None or ``"none"`` uses the raw sum.
                Case-insensitive.
            deadline: Seconds until the future fails with `FutureTimeoutError`;
                None uses the configuration's ``future_deadline``.

        Returns:
            A future for the step's metrics.

        Raises:
            ValueError: An unknown normalization.
            TypeError: ``adam_params`` is not a `tinker.AdamParams`.
            ClientClosedError: The client was closed or its model unloaded.
        """
        self._check_open()
        if not isinstance(adam_params, tinker.AdamParams):
            raise TypeError(
                f"adam_params must be a tinker.AdamParams, got {type(adam_params).__name__}"
            )
        request = _wire.OptimStepRequest(
            model_id=self._model_id,
            seq_id=0,
            adam_params=adam_params,
            grad_accumulation_normalization=_normalization(grad_accumulation_normalization),
        )
        return self._simple_call(endpoints.OPTIM_STEP, request, deadline)

    # ------------------------------------------------------------------ checkpoints

    @rpc
    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        *,
        overwrite: bool = False,
        user_metadata: Mapping[str, str] | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Start[ttypes.SaveWeightsResponse]:
        """Save the full training state (weights and optimizer) as a checkpoint.

        Args:
            name: The checkpoint name, e.g. ``"step-100"``: letters, digits, ``-``,
                ``_`` and ``.``.
            ttl_seconds: Delete the checkpoint after this many seconds; None keeps it.
            overwrite: Replace a checkpoint of the same name. Without it a name this
                training client already saved fails the future (tinker's default; the
                local trainer says which name).
            user_metadata: String pairs recorded with the checkpoint (tinker's
                ``RestClient`` lists them).
            timeout: Fireworks' name for ``deadline``; give one or the other.
            deadline: Seconds until the future fails with `FutureTimeoutError`;
                None uses the configuration's ``future_deadline``.

        Returns:
            A future for the answer; its ``path`` is what `load_state` takes.

        Raises:
            ValueError: An invalid name, TTL or metadata, or both ``timeout`` and
                ``deadline``.
            ClientClosedError: The client was closed or its model unloaded.
        """
        self._check_open()
        _checkpoint_paths.validate_name(name)
        if timeout is not None and deadline is not None:
            raise ValueError("give timeout or deadline, not both")
        request = _wire.SaveWeightsRequest(
            model_id=self._model_id,
            seq_id=0,
            path=name,
            overwrite=bool(overwrite),
            ttl_seconds=_check_ttl(ttl_seconds),
            user_metadata=None
            if user_metadata is None
            else string_map(user_metadata, "user_metadata"),
        )
        return self._simple_call(
            endpoints.SAVE_WEIGHTS, request, deadline if timeout is None else timeout
        )

    @rpc
    def load_state(
        self, path: str, *, deadline: float | None = None
    ) -> Start[ttypes.LoadWeightsResponse]:
        """Load a checkpoint's weights; the optimizer starts fresh.

        Args:
            path: A checkpoint name of this job, ``cross_job://<job_id>/<name>`` (see
                `resolve_checkpoint_path`), or the peers' forms of it,
                ``tinker://<job_id>/weights/<name>`` and ``<account>/<job_id>/<name>``.
            deadline: Seconds until the future fails with `FutureTimeoutError`;
                None uses the configuration's ``future_deadline``.

        Returns:
            A future for the answer.

        Raises:
            ValueError: An invalid path (checked before anything is sent).
            ClientClosedError: The client was closed or its model unloaded.
        """
        return self._load(path, optimizer=False, deadline=deadline)

    @rpc
    def load_state_with_optimizer(
        self, path: str, *, deadline: float | None = None
    ) -> Start[ttypes.LoadWeightsResponse]:
        """Load a checkpoint's weights and optimizer state, to resume training:
        `load_state` (the same arguments, answer and errors) with the optimizer's state.
        """
        return self._load(path, optimizer=True, deadline=deadline)

    def _load(
        self, path: str, *, optimizer: bool, deadline: float | None
    ) -> Start[ttypes.LoadWeightsResponse]:
        self._check_open()
        ref = _checkpoint_paths.parse_checkpoint_path(path)
        request = _wire.LoadWeightsRequest(
            model_id=self._model_id, seq_id=0, path=str(ref), optimizer=optimizer
        )
        return self._simple_call(endpoints.LOAD_WEIGHTS, request, deadline)

    def resolve_checkpoint_path(self, name: str, source_job_id: str | None = None) -> str:
        """Return the path that `load_state` takes for a checkpoint (no network).

        Args:
            name: The checkpoint name (surrounding whitespace is dropped).
            source_job_id: The job that saved it, when not this one.

        Returns:
            ``name``, or ``cross_job://<source_job_id>/<name>``.

        Raises:
            ValueError: An invalid name or job id.
        """
        if source_job_id is not None:
            return _checkpoint_paths.cross_job_path(
                _stripped(source_job_id, "source_job_id"), _stripped(name, "name")
            )
        return str(_checkpoint_paths.parse_checkpoint_path(name))

    async def list_checkpoints(self) -> list[str]:
        """List the trainer's saved training-state checkpoints.

        This is a plain request, not part of the call order: it lists what the trainer
        has saved when the request arrives, so a `save_state` still in flight may be
        missing. Wait for the `save_state` future first to see it.

        Returns:
            The checkpoint names, sorted.

        Raises:
            ClientClosedError: The client was closed.
            APIError: The trainer could not answer.
        """
        self._check_usable()
        return await self._transport.call(endpoints.LIST_CHECKPOINTS)

    # ------------------------------------------------------------------ sampler exports

    @rpc
    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        *,
        checkpoint_type: str | None = None,
        deadline: float | None = None,
    ) -> Start[ttypes.SaveWeightsForSamplerResponse]:
        """Export the current weights for sampling, as snapshot ``<name>-<session_id>``.

        Args:
            name: The export's base name; the client appends its 8-hex `session_id`.
            ttl_seconds: Delete the export after this many seconds; None keeps it.
            checkpoint_type: ``"base"`` (full weights), ``"delta"`` (the difference
                to this model's previous export) or ``"merged_base"``; case-insensitive.
                A ``delta`` requested as the model's first export (none to differ
                from, e.g. right after a resume) is written with the full weights, and
                its metadata says so. None picks ``base`` for LoRA, and for
                full-parameter models ``base`` for this client's first export and
                ``delta`` afterwards.
            deadline: Seconds until the future fails with `FutureTimeoutError`;
                None uses the configuration's ``future_deadline``.

        Returns:
            A future for the answer; its ``path`` identifies the export.

        Raises:
            ValueError: An invalid name, TTL or checkpoint type.
            ClientClosedError: The client was closed or its model unloaded.
        """
        self._check_open()
        snapshot = self._snapshot_name(name)
        ttl = _check_ttl(ttl_seconds)
        if checkpoint_type is not None:
            _explicit_checkpoint_type(checkpoint_type)
        resolved = self._resolve_deadline(deadline)
        return lambda: self._start_export(snapshot, ttl, checkpoint_type, resolved)

    def _start_export(
        self,
        snapshot: str,
        ttl_seconds: int | None,
        checkpoint_type: str | None,
        deadline: float | None,
    ) -> AsyncAPIFuture[ttypes.SaveWeightsForSamplerResponse]:
        # The default type depends on the exports in flight: decided on the loop.
        request = _wire.SaveWeightsForSamplerRequest(
            model_id=self._model_id,
            seq_id=0,
            path=snapshot,
            checkpoint_type=self._checkpoint_type(checkpoint_type),
            ttl_seconds=ttl_seconds,
        )
        future = self._simple_call(endpoints.SAVE_WEIGHTS_FOR_SAMPLER, request, deadline)()
        # Track exports for the base/delta default: an export counts once it is in
        # flight, and stops counting if it fails.
        self._exports_pending += 1
        kind = request.checkpoint_type

        def settle() -> None:
            self._exports_pending -= 1
            if future.state is FutureState.DONE:
                self._exports_ok += 1
                if kind == "base" or (kind == "delta" and self._chain_head is not None):
                    self._chain[snapshot] = self._chain_head if kind == "delta" else None
                # A delta on an export this client did not make stays out of the chain:
                # what it applies to is unknown here.
                if kind != "merged_base":
                    self._chain_head = snapshot

        future._on_finish(settle)
        return future

    async def save_weights_for_sampler_ext(
        self, name: str, checkpoint_type: str | None = None, ttl_seconds: int | None = None
    ) -> SaveSamplerResult:
        """Export the current weights for sampling and wait until the export exists.

        The export is queued when the coroutine starts running (on the blocking facade:
        at the call), so it follows every call made before that and precedes every
        call made after.

        Args:
            name: The export's base name; the client appends its 8-hex `session_id`.
            checkpoint_type: ``"base"``, ``"delta"`` or ``"merged_base"``
                (case-insensitive); None picks as `save_weights_for_sampler` does.
            ttl_seconds: Delete the export after this many seconds; None keeps it.

        Returns:
            The trainer's path and the snapshot name ``<name>-<session_id>``.

        Raises:
            ValueError: An invalid name, TTL or checkpoint type.
            RequestFailedError: The trainer could not export.
            ClientClosedError: The client was closed or its model unloaded.
        """
        snapshot = self._snapshot_name(name)
        response = await self.save_weights_for_sampler(
            name, ttl_seconds, checkpoint_type=checkpoint_type
        )
        return SaveSamplerResult(path=response.path, snapshot_name=snapshot)

    async def save_weights_and_get_sampling_client(
        self, name: str | None = None
    ) -> AsyncSamplingClient:
        """Export the current weights and return a sampling client for them.

        With a deployment configured on the service client, the export is a delta
        only when the deployment holds the export it applies to (a base otherwise),
        and it is hot-loaded before the client is returned.

        Args:
            name: The export's base name; None picks ``sampler-<n>``.

        Returns:
            A sampling client on the new export.

        Raises:
            RequestFailedError: The trainer could not export.
            HotLoadError: The deployment did not load it.
            ClientClosedError: The client was closed or its model unloaded.
        """
        if name is None:
            self._sampler_names += 1
            name = f"sampler-{self._sampler_names}"
        deployment = self._service.deployment
        checkpoint_type = None
        if deployment is not None:
            checkpoint_type = await self.next_checkpoint_type(deployment)
        result = await self.save_weights_for_sampler_ext(name, checkpoint_type)
        return await self._service.create_sampling_client(model_path=result.path)

    async def create_sampling_client(self, model_path: str) -> AsyncSamplingClient:
        """A sampling client on a sampler export: the service client's
        `create_sampling_client`, on a deployment when one is configured."""
        return await self._service.create_sampling_client(model_path=model_path)

    last_sampler_snapshot: ReadOnly[str | None] = ReadOnly(
        "_chain_head",
        """The snapshot name of this client's latest finished base or delta export: the
        one the trainer diffs its next delta against.""",
    )

    def delta_base(self, snapshot: str) -> tuple[bool, str | None]:
        """Whether ``snapshot`` is one of this client's exports, and if so the snapshot
        it is a delta on (None for a base export)."""
        if snapshot in self._chain:
            return True, self._chain[snapshot]
        return False, None

    async def next_checkpoint_type(self, deployment: AsyncDeployment) -> str:
        """``delta`` if the next export may be a delta for ``deployment``, else ``base``.

        A delta is possible only for full-parameter training, and only when every
        replica serves the export the trainer will diff it against; anything else (a
        fresh client, an export the deployment never loaded, a replica elsewhere)
        needs a base. Asking the deployment, not remembering, is what lets a loop
        resume after a restart.

        Raises:
            APIError: The deployment could not answer.
        """
        head = self._chain_head
        if self.is_lora or head is None:
            return "base"
        serving = await deployment.serving(base_model=self.base_model)
        return "delta" if serving == head else "base"

    async def get_tokenizer(self) -> Any:
        """The tokenizer of this model: the one configured on the service client (or
        its deployment), else the one the trainer names (`ByteTokenizer` for the local
        trainer's stand-ins). Loaded once.

        Raises:
            ImportError: A Hugging Face tokenizer without ``transformers`` installed.
            OSError: ``transformers`` could not find it.
        """
        return await self._service._tokenizer_for(self)

    def _snapshot_name(self, name: str) -> str:
        _checkpoint_paths.validate_name(name, "sampler export name")
        snapshot = f"{name}-{self._session_suffix}"
        return _checkpoint_paths.validate_name(snapshot, "sampler snapshot name")

    def _checkpoint_type(self, checkpoint_type: str | None) -> str:
        if checkpoint_type is not None:
            return _explicit_checkpoint_type(checkpoint_type)
        if self.is_lora:
            return "base"
        # Full-parameter: a delta needs a previous export to apply to.
        return "delta" if self._exports_ok or self._exports_pending else "base"

    # ------------------------------------------------------------------ model

    async def get_info(self) -> ttypes.GetInfoResponse:
        """Describe the model (architecture, name, tokenizer, LoRA rank).

        Returns:
            The trainer's description.

        Raises:
            ClientClosedError: The client was closed.
            APIError: The trainer could not answer.
        """
        self._check_usable()
        request = _wire.GetInfoRequest(model_id=self._model_id)
        return await self._transport.call(endpoints.GET_INFO, _wire.encode_request(request))

    async def unload_model(self) -> ttypes.UnloadModelResponse:
        """Finish every pending call, then unload the model from the trainer.

        New calls are refused from the moment this is called.

        Returns:
            The trainer's answer.

        Raises:
            ClientClosedError: The client was already closed or unloading.
            APIError: The trainer could not unload.
        """
        self._check_usable()
        self._closed_reason = "the model was unloaded"
        await self._drain()
        unload = endpoints.UNLOAD_MODEL
        request = _wire.UnloadModelRequest(model_id=self._model_id)
        answer = await self._transport.post(unload.path, _wire.encode_request(request))
        request_id = ack_request_id(answer, unload.name)
        payload = await self._poller.wait(request_id, unload.request_type)
        response = decode_result(unload, payload, request_id=request_id)
        await self._shutdown("the model was unloaded")
        self._service._forget(self)
        return response

    # ------------------------------------------------------------------ plumbing

    def _check_usable(self) -> None:
        self._transport.check_loop()
        self._check_open()

    def _check_open(self) -> None:
        # Plain reads, so the argument checks can run it on the facade's calling thread.
        self._service._check_open()
        if self._closed_reason is not None:
            raise ClientClosedError(f"{self._closed_reason}; create a new training client")

    def _resolve_deadline(self, deadline: float | None) -> float | None:
        return resolve_deadline(deadline, self._config)

    def _new_future(self, kind: str, deadline: float | None) -> AsyncAPIFuture[Any]:
        future: AsyncAPIFuture[Any] = AsyncAPIFuture(kind=kind, deadline=deadline)
        self._live.add(future)
        future._on_finish(lambda: self._live.discard(future))
        return future

    def _enqueue(self, call: Call) -> None:
        self._queue.put(call)

    def _simple_call(
        self, endpoint: endpoints.Endpoint[R], request: _wire.Request, deadline: float | None
    ) -> Start[R]:
        """A one-request RPC: encoded at the call, enqueued by the start."""
        resolved = self._resolve_deadline(deadline)
        bodies = templates([_wire.encode_request(request)])
        return lambda: self._enqueue_one(endpoint, bodies, resolved)

    def _enqueue_one(
        self,
        endpoint: endpoints.Endpoint[R],
        encoded: list[bytes] | ValueError,
        deadline: float | None,
    ) -> AsyncAPIFuture[R]:
        self._check_usable()
        bodies = failed_bodies(encoded) if isinstance(encoded, ValueError) else encoded
        # The future is made last: a call that raises leaves nothing pending behind.
        future: AsyncAPIFuture[R] = self._new_future(endpoint.name, deadline)

        async def finish(payloads: list[Any]) -> R:
            return decode_result(endpoint, payloads[0])

        self._enqueue(
            Call(
                endpoint=endpoint,
                future=future,
                finish=finish,
                bodies=bodies,
            )
        )
        return future

    def _forward_call(
        self,
        endpoint: endpoints.Endpoint[tinker.ForwardBackwardOutput],
        data: Sequence[tinker.Datum],
        loss: _Loss,
        deadline: float | None,
    ) -> AsyncAPIFuture[tinker.ForwardBackwardOutput]:
        self._check_usable()
        batch = list(data)
        prepared = self._prepare_forward_bodies(endpoint, batch, loss)
        offload = prepared.offload
        tokens = _response_tokens(batch) if loss.name == "cross_entropy" else None
        # The future is made last: a call that raises leaves nothing pending behind.
        future: AsyncAPIFuture[tinker.ForwardBackwardOutput] = self._new_future(
            endpoint.name, deadline
        )

        async def finish(payloads: list[Any]) -> tinker.ForwardBackwardOutput:
            return await _forward_output(
                endpoint, payloads, offload=offload, response_tokens=tokens
            )

        self._enqueue(
            Call(
                endpoint=endpoint,
                future=future,
                finish=finish,
                bodies=prepared.bodies,
                offload=offload,
                protobuf=prepared.protobuf,
            )
        )
        return future

    def _prepare_forward_bodies(
        self, endpoint: endpoints.Endpoint[Any], batch: list[tinker.Datum], loss: _Loss
    ) -> _Prepared:
        """Chunk a batch and encode one body per chunk (seq_id still unset).

        Small batches are encoded now, so structural problems raise at the call site;
        large ones in a worker thread, overlapping with earlier sends. Values that JSON
        cannot carry (NaN) are found when the sender serialises the call: its future
        fails and nothing is sent. Large batches also ask for protobuf results.
        """
        limits = self._config.limits
        # One datum is always one chunk (an oversized datum travels alone).
        chunks = (
            [batch]
            if len(batch) == 1
            else _wire.chunk_data(
                batch, max_datums=limits.max_chunk_datums, max_bytes=limits.max_chunk_bytes
            )
        )

        def encode() -> list[JSON]:
            return [
                _wire.encode_request(
                    _wire.ForwardRequest(
                        model_id=self._model_id,
                        seq_id=0,
                        data=chunk,
                        loss_fn=loss.name,
                        loss_fn_config=loss.config,
                        forward_only=endpoint is endpoints.FORWARD,
                        comms=self._comms,
                    )
                )
                for chunk in chunks
            ]

        estimate = _estimated_bytes(batch)
        threshold = limits.protobuf_result_bytes
        protobuf = threshold is not None and estimate > threshold
        if estimate <= limits.offload_bytes:
            bodies = templates(encode())
            if isinstance(bodies, ValueError):
                return _Prepared(failed_bodies(bodies), offload=False, protobuf=protobuf)
            return _Prepared(bodies, offload=False, protobuf=protobuf)

        def serialise() -> list[bytes]:
            return [template(body) for body in encode()]

        loop = asyncio.get_running_loop()
        if not self._live and estimate <= _INLINE_WHEN_IDLE * limits.offload_bytes:
            # Nothing in flight on this model: the worker thread would have no send to
            # overlap the encoding with, and would only add a hand-off each way (B3's
            # profile). Failures still reach the call through its future, as from the
            # thread.
            try:
                return _Prepared(serialise(), offload=True, protobuf=protobuf)
            except Exception as exc:
                return _Prepared(failed_bodies(exc), offload=True, protobuf=protobuf)

        # Not in self._tasks: a failure here is a user error, reported through the
        # call's future by the sender, and the Call holds the only reference needed.
        task = loop.create_task(asyncio.to_thread(serialise))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return _Prepared(task, offload=True, protobuf=protobuf)

    async def _drain(self) -> None:
        """Wait until every call made so far has been sent and has resolved."""
        while self._live:
            await asyncio.wait([f._future for f in list(self._live)])

    async def _shutdown(self, reason: str) -> None:
        """Stop the sender and every poll; fail what is still pending."""
        self._closed_reason = self._closed_reason or reason
        for future in list(self._live):
            future._set_exception(ClientClosedError(reason))
        self._queue.fail_queued(reason)
        await self._tasks.aclose()


@attrs.frozen
class _Loss:
    """A built-in loss and its options, as a forward pass sends them (the options
    copied at the call)."""

    name: str
    config: dict[str, Any] | None = None


_CROSS_ENTROPY = _Loss("cross_entropy")


@attrs.frozen
class _Prepared:
    """The encoded chunks of a forward call, and how to move them.

    Attributes:
        bodies: One serialised body per chunk (`ordering.template`), or a future of
            them (encoding in a worker thread, or failed).
        offload: Encode, decode and (de)serialise in worker threads (large batches).
        protobuf: Ask for the results as protobuf (large batches).
    """

    bodies: list[bytes] | asyncio.Future[list[bytes]]
    offload: bool
    protobuf: bool


def _check_data(data: Sequence[tinker.Datum]) -> list[tinker.Datum]:
    if isinstance(data, tinker.Datum) or not isinstance(data, Sequence):
        raise TypeError("data must be a list of tinker.Datum")
    batch = list(data)
    if not batch:
        raise ValueError("data must not be empty")
    for i, datum in enumerate(batch):
        if not isinstance(datum, tinker.Datum):
            raise TypeError(f"data[{i}] is a {type(datum).__name__}, not a tinker.Datum")
    return batch


def _check_forward_args(
    data: Sequence[tinker.Datum], loss_fn: str, loss_fn_config: Mapping[str, Any] | None
) -> None:
    _check_data(data)
    non_empty_str(loss_fn, "loss_fn")
    if loss_fn_config is not None and not isinstance(loss_fn_config, Mapping):
        raise TypeError("loss_fn_config must be a mapping or None")


def _explicit_checkpoint_type(checkpoint_type: object) -> str:
    return one_of(checkpoint_type, _CHECKPOINT_TYPES, "checkpoint_type")


def _tensor_size(tensor: tinker.TensorData) -> int:
    if tensor.sparse_col_indices is not None:
        return 2 * len(tensor.sparse_col_indices)
    return int(tensor.to_numpy().size)


def _estimated_bytes(batch: Sequence[tinker.Datum]) -> int:
    numbers = 0
    for datum in batch:
        numbers += datum.model_input.length
        numbers += sum(_tensor_size(t) for t in datum.loss_fn_inputs.values())
    return numbers * _BYTES_PER_NUMBER


def _response_tokens(batch: Sequence[tinker.Datum]) -> float:
    """Loss tokens of a cross_entropy batch: non-zero weights, or every target."""
    total = 0
    for datum in batch:
        weights = datum.loss_fn_inputs.get("weights")
        if weights is not None:
            total += int(np.count_nonzero(weights.to_numpy()))
        else:
            targets = datum.loss_fn_inputs.get("target_tokens")
            total += _tensor_size(targets) if targets is not None else 0
    return float(total)


def _normalization(value: GradAccNormalization | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, GradAccNormalization):
        return value.value
    choices = [m.value for m in GradAccNormalization]
    return one_of(value, choices, "grad_accumulation_normalization")


def _stripped(value: object, what: str) -> str:
    """``value`` without surrounding whitespace; a ValueError (as every invalid name
    gets) if it is not a string at all."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value.strip()


def _check_ttl(ttl_seconds: int | None) -> int | None:
    return None if ttl_seconds is None else positive_int(ttl_seconds, "ttl_seconds")


async def _forward_output(
    endpoint: endpoints.Endpoint[tinker.ForwardBackwardOutput],
    payloads: list[Any],
    *,
    offload: bool,
    response_tokens: float | None,
) -> tinker.ForwardBackwardOutput:
    """One forward (or forward_backward) output from the results of its chunks."""

    def decode() -> tinker.ForwardBackwardOutput:
        return _wire.combine_outputs([decode_result(endpoint, p) for p in payloads])

    # Protobuf results decode in a fraction of a millisecond even when large: a
    # worker thread would cost more than it saves. Large JSON goes off the loop.
    heavy = offload and not all(isinstance(p, ProtobufBody) for p in payloads)
    output = await asyncio.to_thread(decode) if heavy else decode()
    if response_tokens is not None and "response_tokens" not in output.metrics:
        metrics = {**output.metrics, "response_tokens": response_tokens}
        output = dataclasses.replace(output, metrics=metrics)
    return output
