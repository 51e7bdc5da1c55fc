"""`AsyncSamplingClient`: one ``sample`` / ``compute_logprobs`` API, whatever serves it.

Two backends, chosen by the service client's configuration, never by guessing:

* **a trainer** that hosts tinker sampling (the local trainer, tinker-protocol servers):
  ``sample`` calls the ``asample`` endpoint and long-polls the answer like any future;
* **a hot-load deployment** (a service client with ``deployment=``): the snapshot was
  hot-loaded before the client was returned, and ``sample`` streams completions from
  the deployment through `AsyncDeploymentSampler`.

On a trainer, ``sample`` calls the ``asample`` endpoint and long-polls the answer like any future.
Samples are not ordered, so each call runs as its own task; hundreds of concurrent
calls share the service client's connection pools, and at most
``Limits.max_sample_polls`` of them long-poll at a time.

Sample requests within a sampling session carry a ``seq_id`` that the trainer uses to
deduplicate retried submissions. A client rebuilt from a pickle numbers its requests
from a random offset of its own (``clone * 10**9``), so that clones of one sampling
session never collide.

Pickling: a sampling client pickles to its trainer URL, model and sampling session,
**never its API key**. The unpickled client builds its own connections on first use
and takes the key given to `AsyncSamplingClient.set_api_key`, or else from the
environment (``FIRETITAN_API_KEY``, ``FIREWORKS_API_KEY``, ``TINKER_API_KEY``); close
it with `aclose` when done.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import tinker

from firetitan import _wire
from firetitan._async._checks import positive_int
from firetitan._async._rpc import Start, rpc
from firetitan._async._tasks import TaskSet
from firetitan._async.async_future import AsyncAPIFuture, FutureState, resolve_deadline
from firetitan._async.deployment_sampler import AsyncDeploymentSampler
from firetitan._async.ordering import ack_request_id
from firetitan._async.polling import Poller
from firetitan._config import ClientConfig, resolve_api_key, resolve_base_url
from firetitan._errors import (
    APIResponseValidationError,
    ClientClosedError,
    ClientUsageError,
    FiretitanError,
)
from firetitan._transport import Transport, decode_result
from firetitan._wire import endpoints

__all__ = ["AsyncSamplingClient"]

T = TypeVar("T")

log = logging.getLogger("firetitan")

_CLONE_STRIDE = 10**9


@attrs.frozen
class Parent:
    """What a sampling client made by a service client asks of it.

    Callables rather than the service client itself, so that this module needs neither
    the service nor the training client.

    Attributes:
        check_open: Raises `ClientClosedError` once the service client is closed.
        tokenizer: Loads the tokenizer of what the client samples.
    """

    check_open: Callable[[], None]
    tokenizer: Callable[[], Awaitable[Any]]


class AsyncSamplingClient:
    """Samples completions (and prompt logprobs) from saved weights or a base model.

    Usually created by `AsyncFiretitanServiceClient.create_sampling_client` or
    `AsyncFiretitanTrainingClient.save_weights_and_get_sampling_client`, and then
    sharing that service client's connections. It can also be built directly (for
    example in a worker process), in which case it opens its own connections on first
    use and must be closed with `aclose`.

    Picklable; the pickle never contains the API key (see `set_api_key`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        model_path: str | None = None,
        base_model: str | None = None,
        sampling_session_id: str | None = None,
        api_key: str | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        """Create a standalone sampling client (no network until first use).

        Args:
            base_url: The trainer; None reads ``FIRETITAN_BASE_URL``/``TINKER_BASE_URL``.
            model_path: A sampler export's path (``save_weights_for_sampler``).
            base_model: A base model name, when sampling without a ``model_path``.
            sampling_session_id: An existing sampling session to sample in.
            api_key: The key; None reads the environment on first use.
            config: Timeouts, retries and limits.

        Raises:
            ValueError: No trainer URL, or none of ``model_path``, ``base_model`` and
                ``sampling_session_id``.
        """
        if model_path is None and base_model is None and sampling_session_id is None:
            raise ValueError("give model_path, base_model or sampling_session_id")
        self._base_url = resolve_base_url(base_url)
        self._model_path = model_path
        self._base_model = base_model
        self._sampling_session_id = sampling_session_id
        self._config = config or ClientConfig()
        self._api_key = api_key
        self._parent: Parent | None = None
        self._transport: Transport | None = None
        self._own_transport = True
        self._poller: Poller | None = None
        self._tasks = TaskSet("sampling client")
        self._live: set[AsyncAPIFuture[Any]] = set()
        # A standalone client may be one of many clones of a pickled client: it numbers
        # its requests from a random range of its own. The creator's client starts at 1.
        clone = 1 + secrets.randbelow(_CLONE_STRIDE - 1)
        self._seq = itertools.count(clone * _CLONE_STRIDE)
        self._closed = False
        self._deployment_sampler: AsyncDeploymentSampler | None = None
        self._tokenizer: Any = None

    @classmethod
    def _attached(
        cls,
        parent: Parent,
        transport: Transport,
        *,
        model_path: str | None,
        base_model: str | None,
        sampling_session_id: str,
    ) -> AsyncSamplingClient:
        """A client sharing a service client's transport (and lifetime)."""
        client = cls(
            transport.base_url,
            model_path=model_path,
            base_model=base_model,
            sampling_session_id=sampling_session_id,
            config=transport.config,
        )
        client._parent = parent
        client._transport = transport
        client._own_transport = False
        client._seq = itertools.count(1)
        return client

    @classmethod
    def _on_deployment(
        cls,
        parent: Parent,
        sampler: AsyncDeploymentSampler,
        *,
        model_path: str,
        base_model: str | None,
        config: ClientConfig,
    ) -> AsyncSamplingClient:
        """A client sampling a snapshot that ``sampler``'s deployment serves."""
        client = cls(
            sampler.deployment.config.base_url,
            model_path=model_path,
            base_model=base_model,
            config=config,
        )
        client._parent = parent
        client._own_transport = False
        client._deployment_sampler = sampler
        return client

    # ------------------------------------------------------------------ properties

    @property
    def deployment_sampler(self) -> AsyncDeploymentSampler | None:
        """The deployment sampler behind this client, when a deployment serves it."""
        return self._deployment_sampler

    @property
    def model_path(self) -> str | None:
        """The sampler export sampled from, if any."""
        return self._model_path

    @property
    def base_model(self) -> str | None:
        """The base model sampled from, if given."""
        return self._base_model

    @property
    def sampling_session_id(self) -> str | None:
        """The trainer's sampling session, if any."""
        return self._sampling_session_id

    def set_api_key(self, api_key: str) -> None:
        """Set the API key of a standalone (e.g. unpickled) client before first use.

        Args:
            api_key: The key.

        Raises:
            ClientUsageError: The client already connected, or shares a service
                client's connections.
        """
        if self._transport is not None:
            raise ClientUsageError("the API key can only be set before the client's first use")
        self._api_key = api_key

    async def get_base_model(self) -> str:
        """The base model this client samples from; for a sampler export, the one its
        model was trained from (the trainer reads it from the export, once).

        Raises:
            ClientUsageError: A standalone client made from a ``model_path`` alone (no
                sampling session to ask about).
            APIStatusError: The trainer does not know the sampling session.
        """
        if self._base_model:
            return self._base_model
        if self._sampling_session_id is None:
            raise ClientUsageError(
                "this sampling client has no sampling session to ask its base model about; "
                "create it with the service client's create_sampling_client"
            )
        self._check_usable()
        sampler = endpoints.GET_SAMPLER
        path = sampler.path.format(sampling_session_id=self._sampling_session_id)
        answer = await self._connect().call(sampler, path=path)
        if not answer.base_model:
            raise APIResponseValidationError("the sampler's description names no base_model")
        self._base_model = answer.base_model
        return answer.base_model

    async def get_tokenizer(self) -> Any:
        """The tokenizer of the sampled model: the one configured on the service client
        (or its deployment), else the one the exporting model's trainer names
        (`ByteTokenizer` for the local trainer's stand-ins). Loaded once.

        Raises:
            ClientUsageError: No tokenizer is known (a standalone client, or a base
                model with none configured).
            ImportError: A Hugging Face tokenizer without ``transformers`` installed.
        """
        if self._tokenizer is None:
            if self._parent is None:
                raise ClientUsageError(
                    "a standalone sampling client knows no tokenizer: load one with "
                    "firetitan.tokenizers.load_tokenizer"
                )
            self._tokenizer = await self._parent.tokenizer()
        return self._tokenizer

    def __repr__(self) -> str:
        source = (
            f"model_path={self._model_path!r}"
            if self._model_path
            else (f"base_model={self._base_model!r}")
        )
        return f"<AsyncSamplingClient {source} base_url={self._base_url!r}>"

    def __reduce__(self) -> tuple[Callable[..., AsyncSamplingClient], tuple[Any, ...]]:
        if self._deployment_sampler is not None:
            raise TypeError(
                "a deployment-backed sampling client cannot be pickled; build an "
                "AsyncDeploymentSampler in the other process"
            )
        # Never the key, never live connections: the clone connects on its own.
        return (
            _restore,
            (
                self._base_url,
                self._model_path,
                self._base_model,
                self._sampling_session_id,
                self._config,
            ),
        )

    # ------------------------------------------------------------------ sampling

    @rpc
    def sample(
        self,
        prompt: tinker.ModelInput,
        num_samples: int,
        sampling_params: tinker.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: tinker.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
        *,
        deadline: float | None = None,
    ) -> Start[tinker.SampleResponse]:
        """Sample ``num_samples`` continuations of ``prompt``.

        The options after ``sampling_params`` are tinker's, in tinker's order. Every
        logprob is the model's own (the unmodified distribution), like ``forward``'s.

        Args:
            prompt: The prompt tokens.
            num_samples: How many continuations.
            sampling_params: ``max_tokens``, ``temperature``, ``top_p``, ``stop``,
                ``seed``... A ``stop`` string is one stop string; on a deployment,
                sample ``i`` is seeded ``seed + i``, so seeded samples still differ.
            include_prompt_logprobs: Also return each prompt token's logprob
                (``prompt_logprobs``; None for the first token).
            topk_prompt_logprobs: Also return this many most likely tokens at each
                prompt position (``topk_prompt_logprobs``; None for the first).
            topk_sample_logprobs: Also return this many most likely tokens at each
                sampled position (each sequence's ``topk_logprobs``). Trainer only.
            target_prompt_logprobs: Token ids to score at prompt positions, an int64
                ``tinker.TensorData`` of shape ``[len(prompt) - 1, K]``: cell ``[i, j]``
                is scored at position ``i + 1``; ``-1`` asks nothing. Dense or sparse
                CSR; the response's ``target_prompt_logprobs`` has the same shape and
                layout, 0.0 where ``-1`` was. Trainer only.
            prompt_alt_tokens_k: Draw this many tokens, at the request's temperature,
                at every prompt position after the first (``prompt_alt_tokens``).
                Trainer only.
            prompt_logprobs_last_n: Score only the last N prompt tokens (earlier
                prompt logprobs and top-k rows are None); needs
                ``include_prompt_logprobs``. Trainer only.
            deadline: Seconds until the future fails with `FutureTimeoutError`;
                None uses the configuration's ``future_deadline``.

        Returns:
            A future for the sampled sequences (tokens, logprobs, stop reasons) and
            whatever else was asked for.

        Raises:
            TypeError: Arguments of the wrong type.
            ValueError: ``num_samples`` below 1, a negative top-k or draw count,
                ``target_prompt_logprobs`` not a 2-D int64 tensor,
                ``prompt_logprobs_last_n`` below 1 or without prompt logprobs, or a
                trainer-only option on a deployment.
            ClientClosedError: The client (or its service client) was closed.
        """
        self._check_prompt(prompt)
        positive_int(num_samples, "num_samples")
        positive_int(topk_prompt_logprobs, "topk_prompt_logprobs", zero=True)
        positive_int(topk_sample_logprobs, "topk_sample_logprobs", zero=True)
        positive_int(prompt_alt_tokens_k, "prompt_alt_tokens_k", zero=True)
        if not isinstance(sampling_params, tinker.SamplingParams):
            raise TypeError("sampling_params must be a tinker.SamplingParams")
        if target_prompt_logprobs is not None:
            if not isinstance(target_prompt_logprobs, tinker.TensorData):
                raise TypeError("target_prompt_logprobs must be a tinker.TensorData")
            shape = target_prompt_logprobs.shape
            if target_prompt_logprobs.dtype != "int64" or shape is None or len(shape) != 2:
                raise ValueError(
                    "target_prompt_logprobs must be a 2-D int64 tensor of token ids, "
                    f"[len(prompt) - 1, K]; got {target_prompt_logprobs.dtype} {shape}"
                )
        if prompt_logprobs_last_n is not None:
            positive_int(prompt_logprobs_last_n, "prompt_logprobs_last_n")
            if not include_prompt_logprobs:
                raise ValueError("prompt_logprobs_last_n needs include_prompt_logprobs=True")
        if self._deployment_sampler is not None:
            trainer_only = {
                "topk_sample_logprobs": topk_sample_logprobs != 0,
                "target_prompt_logprobs": target_prompt_logprobs is not None,
                "prompt_alt_tokens_k": prompt_alt_tokens_k != 0,
                "prompt_logprobs_last_n": prompt_logprobs_last_n is not None,
            }
            asked = [name for name, given in trainer_only.items() if given]
            if asked:
                raise ValueError(
                    f"{', '.join(asked)}: served by the trainer's sampler only, not by "
                    "a deployment; sample without a deployment to use it"
                )
        # What is asked besides the sequences, as `_wire.SampleRequest` fields.
        scores: dict[str, Any] = {
            "prompt_logprobs": include_prompt_logprobs,
            "topk_prompt_logprobs": topk_prompt_logprobs,
            "topk_sample_logprobs": topk_sample_logprobs,
            "target_prompt_logprobs": target_prompt_logprobs,
            "prompt_alt_tokens_k": prompt_alt_tokens_k,
            "prompt_logprobs_last_n": prompt_logprobs_last_n,
        }
        resolved = resolve_deadline(deadline, self._config)
        return lambda: self._submit(
            "sample", prompt, num_samples, sampling_params, scores, resolved, _as_is
        )

    @rpc
    def compute_logprobs(
        self, prompt: tinker.ModelInput, *, deadline: float | None = None
    ) -> Start[list[float | None]]:
        """Compute the model's logprob of every prompt token given the ones before.

        Args:
            prompt: The tokens to score.
            deadline: Seconds until the future fails with `FutureTimeoutError`;
                None uses the configuration's ``future_deadline``.

        Returns:
            A future for one logprob per prompt token (None for the first token).

        Raises:
            TypeError: ``prompt`` is not a `tinker.ModelInput`.
            ClientClosedError: The client (or its service client) was closed.
        """
        self._check_prompt(prompt)
        params = tinker.SamplingParams(max_tokens=1)
        scores = {"prompt_logprobs": True}
        resolved = resolve_deadline(deadline, self._config)
        return lambda: self._submit(
            "compute_logprobs", prompt, 1, params, scores, resolved, _prompt_logprobs
        )

    def _check_prompt(self, prompt: tinker.ModelInput) -> None:
        self._check_open()
        if not isinstance(prompt, tinker.ModelInput):
            raise TypeError("prompt must be a tinker.ModelInput")

    def _submit(
        self,
        kind: str,
        prompt: tinker.ModelInput,
        num_samples: int,
        params: tinker.SamplingParams,
        scores: dict[str, Any],
        deadline: float | None,
        transform: Callable[[tinker.SampleResponse], T],
    ) -> AsyncAPIFuture[T]:
        self._check_usable()
        future: AsyncAPIFuture[T] = AsyncAPIFuture(kind=kind, deadline=deadline)
        sampler = self._deployment_sampler
        if sampler is not None:

            async def sample() -> tinker.SampleResponse:
                on = sampler
                if _has_stop_ids(params):  # they become text through the model's tokenizer
                    on = AsyncDeploymentSampler(
                        sampler.deployment, tokenizer=await self.get_tokenizer()
                    )
                return await on._sample(
                    _wire.SampleRequest(
                        prompt=prompt, num_samples=num_samples, sampling_params=params, **scores
                    )
                )

            run = self._run_on_deployment(future, sample, transform)
        else:
            body = self._body(prompt, num_samples, params, scores)
            run = self._run(future, body, transform)
        self._live.add(future)
        future._on_finish(lambda: self._live.discard(future))
        task = self._tasks.spawn(run, name=f"firetitan {kind}")
        future._on_finish(task.cancel)  # cancelling the future stops its request...
        future._on_finish(lambda: self._cancel_on_trainer(future))  # ...there too
        return future

    def _body(
        self,
        prompt: tinker.ModelInput,
        num_samples: int,
        params: tinker.SamplingParams,
        scores: dict[str, Any],
    ) -> dict[str, Any]:
        in_session = self._sampling_session_id is not None
        return _wire.encode_request(
            _wire.SampleRequest(
                prompt=prompt,
                num_samples=num_samples,
                sampling_params=params,
                model_path=None if in_session else self._model_path,
                base_model=None if in_session else self._base_model,
                sampling_session_id=self._sampling_session_id,
                seq_id=next(self._seq) if in_session else None,
                **scores,
            )
        )

    async def _run_on_deployment(
        self,
        future: AsyncAPIFuture[T],
        sample: Callable[[], Awaitable[tinker.SampleResponse]],
        transform: Callable[[tinker.SampleResponse], T],
    ) -> None:
        try:
            future._set_state(FutureState.SENDING)
            future._set_result(transform(await sample()))
        except Exception as exc:
            future._set_exception(exc)

    def _cancel_on_trainer(self, future: AsyncAPIFuture[Any]) -> None:
        """Tell the trainer to drop an abandoned request it acknowledged (best effort:
        a sample that is already running finishes there, unread)."""
        if not future.cancelled() or self._transport is None or self._closed:
            return
        for request_id in future.request_ids:
            self._tasks.spawn(self._send_cancel(request_id), name="firetitan cancel_future")

    async def _send_cancel(self, request_id: str) -> None:
        assert self._transport is not None
        try:
            body = _wire.encode_request(_wire.CancelFutureRequest(request_id=request_id))
            await self._transport.call(endpoints.CANCEL_FUTURE, body)
        except FiretitanError as exc:  # nothing to undo: the sample stays unread
            log.debug("firetitan: cancelling %s on the trainer failed: %s", request_id, exc)

    async def _run(
        self,
        future: AsyncAPIFuture[T],
        body: dict[str, Any],
        transform: Callable[[tinker.SampleResponse], T],
    ) -> None:
        try:
            transport = self._connect()
            if self._poller is None:
                self._poller = Poller(transport, self._config.limits.max_sample_polls)
            future._set_state(FutureState.SENDING)
            answer = await transport.post(endpoints.ASAMPLE.path, body)
            request_id = ack_request_id(answer, "asample")
            future._add_request_id(request_id)
            future._set_state(FutureState.SENT)
            payload = await self._poller.wait(request_id, endpoints.ASAMPLE.request_type)
            response = decode_result(endpoints.ASAMPLE, payload, request_id=request_id)
            future._set_result(transform(response))
        except Exception as exc:
            future._set_exception(exc)

    # ------------------------------------------------------------------ lifecycle

    def _check_usable(self) -> None:
        self._check_open()
        if self._transport is not None:
            self._transport.check_loop()

    def _check_open(self) -> None:
        # Plain reads, so the argument checks can run it on the facade's calling thread.
        if self._closed:
            raise ClientClosedError("the sampling client was closed")
        if self._parent is not None:
            self._parent.check_open()

    def _connect(self) -> Transport:
        if self._transport is None:
            key = resolve_api_key(self._api_key)
            self._transport = Transport(self._base_url, key, self._config)
        return self._transport

    async def aclose(self) -> None:
        """Stop pending requests and close this client's own connections, if any.

        Pending futures fail with `ClientClosedError`.
        """
        await self._shutdown("the sampling client was closed")
        if self._own_transport and self._transport is not None:
            await self._transport.aclose()

    async def _shutdown(self, reason: str) -> None:
        self._closed = True
        for future in list(self._live):
            future._set_exception(ClientClosedError(reason))
        await self._tasks.aclose()

    async def __aenter__(self) -> AsyncSamplingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _restore(
    base_url: str,
    model_path: str | None,
    base_model: str | None,
    sampling_session_id: str | None,
    config: ClientConfig,
) -> AsyncSamplingClient:
    return AsyncSamplingClient(
        base_url,
        model_path=model_path,
        base_model=base_model,
        sampling_session_id=sampling_session_id,
        config=config,
    )


def _has_stop_ids(params: tinker.SamplingParams) -> bool:
    stop = params.stop
    return not isinstance(stop, str) and any(isinstance(s, int) for s in stop or ())


def _as_is(response: tinker.SampleResponse) -> tinker.SampleResponse:
    return response


def _prompt_logprobs(response: tinker.SampleResponse) -> list[float | None]:
    logprobs = response.prompt_logprobs
    if logprobs is None:
        raise APIResponseValidationError("the trainer answered without prompt_logprobs")
    return list(logprobs)
