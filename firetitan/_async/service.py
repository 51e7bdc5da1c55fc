"""`AsyncFiretitanServiceClient`: a session on one trainer, and the factory of clients.

Lifecycle: the constructor touches neither the loop nor the network. The session
opens in ``__aenter__`` or on first use: ``client/config`` (only for ``tml-`` keys,
as the reference client does), then ``create_session``, then a heartbeat task every
``heartbeat_interval`` seconds. `aclose` stops the heartbeat, fails every pending
future of every child client with `ClientClosedError` and closes the connections;
a closed client refuses further use with `ClientClosedError`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import attrs
from tinker import types as ttypes

from firetitan import _checkpoint_paths, _wire
from firetitan._async._checks import non_empty_str, positive_int, string_map
from firetitan._async._once import Once
from firetitan._async._tasks import TaskSet
from firetitan._async.deployment import AsyncDeployment
from firetitan._async.deployment_sampler import AsyncDeploymentSampler
from firetitan._async.ordering import ack_request_id
from firetitan._async.polling import Poller
from firetitan._async.sampling import AsyncSamplingClient, Parent
from firetitan._async.training import AsyncFiretitanTrainingClient
from firetitan._config import ClientConfig, DeploymentConfig, resolve_api_key, resolve_base_url
from firetitan._errors import (
    APIResponseValidationError,
    ClientClosedError,
    ClientUsageError,
    FiretitanError,
    FutureTimeoutError,
    GoneError,
)
from firetitan._transport import Transport, decode_result
from firetitan._unpicklable import Unpicklable
from firetitan._wire import endpoints
from firetitan.tokenizers import load_tokenizer

__all__ = ["AsyncFiretitanServiceClient"]

log = logging.getLogger("firetitan")

# The protocol version the Firetitan clients report (wire.md §1.2), not our version.
SDK_VERSION = "0.23.0"
# Concurrent long-polls for create_model answers.
_SERVICE_POLLS = 8
# Heartbeats failing for this long are worth a warning: the trainer may reclaim models.
_HEARTBEAT_WARN_S = 120.0

R = TypeVar("R")


class AsyncFiretitanServiceClient(Unpicklable):
    """A session on a Firetitan (or Tinker-protocol) trainer.

    Creates training clients (full-parameter, LoRA or frozen base models) and sampling
    clients. Use it as an async context manager, or call `aclose` when done.

    Args:
        base_url: The trainer's URL; None reads ``FIRETITAN_BASE_URL``, then
            ``TINKER_BASE_URL``.
        api_key: The key sent as ``X-API-Key``; None reads ``FIRETITAN_API_KEY``,
            ``FIREWORKS_API_KEY``, then ``TINKER_API_KEY``. It never appears in reprs,
            logs, exceptions or pickles.
        user_metadata: String pairs recorded with the session and, by default, with
            every model it creates.
        config: Timeouts, retries and limits.
        tags: Session tags; None reads the comma-separated ``TINKER_TAGS``.
        default_headers: Extra headers sent with every request.
        deployment: A hot-load inference deployment to sample from: sampling clients
            then hot-load their snapshot into it and sample there. None samples on the
            trainer.
        deployment_api_key: The deployment's key; None uses ``api_key``.
        tokenizer: A Hugging Face tokenizer name or local folder for
            ``get_tokenizer()``; None uses the deployment's, else the trainer's.

    Raises:
        ValueError: No URL or no key could be found, or a malformed ``base_url``.
        TypeError: ``user_metadata`` is not a mapping of strings.
    """

    _unpicklable = "a service client holds live connections and cannot be pickled"

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        user_metadata: Mapping[str, str] | None = None,
        *,
        config: ClientConfig | None = None,
        tags: list[str] | None = None,
        default_headers: Mapping[str, str] | None = None,
        deployment: DeploymentConfig | None = None,
        deployment_api_key: str | None = None,
        tokenizer: str | None = None,
    ) -> None:
        key = resolve_api_key(api_key)
        config = config or ClientConfig()
        # The transport holds the configuration for this client and its children.
        self._transport = Transport(
            resolve_base_url(base_url), key, config, default_headers=default_headers
        )
        # Only this fact about the key is kept outside the transport.
        self._fetch_client_config = key.startswith("tml-")
        self._user_metadata = string_map(user_metadata, "user_metadata")
        if tags is None:
            tags = [t.strip() for t in os.environ.get("TINKER_TAGS", "").split(",") if t.strip()]
        self._tags = list(tags)
        self._session: Once[str] = Once(self._start_session)
        self._closed = False
        self._tasks = TaskSet("service client")
        self._poller = Poller(self._transport, _SERVICE_POLLS)
        # Each creation in the session is numbered (see _numbered).
        self._model_seqs = itertools.count()
        self._sampling_seqs = itertools.count()
        # Live training clients, by the options they were created with (wire.md §8.6).
        self._training_keys: dict[_wire.ModelSpec, AsyncFiretitanTrainingClient | None] = {}
        self._training_clients: list[AsyncFiretitanTrainingClient] = []
        self._sampling_clients: weakref.WeakSet[AsyncSamplingClient] = weakref.WeakSet()
        self._deployment = (
            None
            if deployment is None
            else AsyncDeployment(
                deployment, api_key=deployment_api_key or key, client_config=config
            )
        )
        self._tokenizer_name = tokenizer or (deployment.tokenizer if deployment else None)
        self._tokenizers: dict[str, Any] = {}

    # ------------------------------------------------------------------ properties

    @property
    def base_url(self) -> str:
        """The trainer's URL."""
        return self._transport.base_url

    @property
    def session_id(self) -> str | None:
        """The trainer's session id, once the session is open."""
        return self._session.value

    @property
    def config(self) -> ClientConfig:
        """Timeouts, retries and limits."""
        return self._transport.config

    @property
    def closed(self) -> bool:
        """Whether `aclose` was called."""
        return self._closed

    @property
    def deployment(self) -> AsyncDeployment | None:
        """The deployment sampling clients sample from, if one is configured."""
        return self._deployment

    def __repr__(self) -> str:
        return (
            f"<AsyncFiretitanServiceClient base_url={self.base_url!r} "
            f"session_id={self._session.value!r}{' closed' if self._closed else ''}>"
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AsyncFiretitanServiceClient:
        try:
            await self._open()
        except BaseException:
            # No __aexit__ follows a failed __aenter__: close the half-open client here,
            # or its connection pools would be left unclosed.
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session: stop the heartbeat, fail pending futures of every client
        created here with `ClientClosedError`, and close the connections.

        Calling it again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        reason = "the service client was closed"
        for training in self._training_clients:
            await training._shutdown(reason)
        for sampling in list(self._sampling_clients):
            await sampling._shutdown(reason)
        await self._tasks.aclose()
        await self._transport.aclose()
        if self._deployment is not None:
            await self._deployment.aclose()

    def _forget(self, client: AsyncFiretitanTrainingClient) -> None:
        """Drop an unloaded model, so that its options may be used again."""
        if client in self._training_clients:
            self._training_clients.remove(client)
        for key, owner in list(self._training_keys.items()):
            if owner is client:
                del self._training_keys[key]

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the service client was closed")

    async def _open(self) -> str:
        """The session's id, opening it first if need be (once)."""
        self._check_open()
        self._transport.check_loop()
        return await self._session.get()

    async def _numbered(self, counter: Iterator[int]) -> tuple[str, int]:
        """The session's id, opening it first if need be, and the next number of
        ``counter``: the trainer deduplicates a retried creation (of a model, of a
        sampling session) on this pair."""
        session_id = await self._open()
        return session_id, next(counter)

    async def _start_session(self) -> str:
        if self._fetch_client_config:
            await self._transport.call(endpoints.CLIENT_CONFIG, {"sdk_version": SDK_VERSION})
        request = _wire.CreateSessionRequest(
            tags=self._tags, user_metadata=self._user_metadata, sdk_version=SDK_VERSION
        )
        answer = await self._transport.call(endpoints.CREATE_SESSION, _wire.encode_request(request))
        session_id = _session_id(answer)
        self._transport.name_session(session_id)
        self._check_open()  # closed while opening: no heartbeat for it
        self._tasks.spawn(self._heartbeat(session_id), name="firetitan heartbeat")
        log.info("firetitan: session %s opened on %s", session_id, self.base_url)
        return session_id

    async def _heartbeat(self, session_id: str) -> None:
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        body = _wire.encode_request(_wire.SessionHeartbeatRequest(session_id=session_id))
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                await self._transport.call(
                    endpoints.SESSION_HEARTBEAT,
                    body,
                    retry=False,
                    attempt_timeout=self.config.timeouts.heartbeat,
                )
                last_ok = loop.time()
            except GoneError:
                log.warning("firetitan: the trainer ended session %s", session_id)
                return
            except ClientClosedError:
                return
            except FiretitanError as exc:
                silent = loop.time() - last_ok
                if silent > _HEARTBEAT_WARN_S:
                    log.warning(
                        "firetitan: no heartbeat reached the trainer for %.0f s (%s); it may "
                        "reclaim this session's models",
                        silent,
                        exc,
                    )

    # ------------------------------------------------------------------ training clients

    async def create_training_client(
        self,
        base_model: str,
        lora_rank: int = 0,
        user_metadata: Mapping[str, str] | None = None,
        *,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        lora_alpha: int | None = 32,
    ) -> AsyncFiretitanTrainingClient:
        """Create a trainable model and return its training client.

        Args:
            base_model: The base model, e.g. ``"accounts/fireworks/models/qwen3-8b"``.
            lora_rank: 0 trains every parameter; a positive rank trains a LoRA adapter.
            user_metadata: String pairs recorded with the model; None uses the
                service client's.
            seed: Seed of the LoRA initialisation; None uses the trainer's seed. A
                full-parameter model starts from the base weights whatever its seed;
                there a seed only tells apart two otherwise identical models on one
                service client.
            train_mlp: Put LoRA adapters on the MLP layers.
            train_attn: Put LoRA adapters on the attention layers.
            train_unembed: Put a LoRA adapter on the output layer.
            lora_alpha: LoRA alpha (ignored for full-parameter training); None lets
                the trainer use ``2 * rank``.

        Returns:
            The training client, once the trainer has created the model.

        Raises:
            ValueError: A training client with the same base model, rank and options
                already exists on this service client (checked before any request),
                or invalid arguments.
            RequestFailedError: The trainer could not create the model.
            ClientClosedError: The service client was closed.
        """
        non_empty_str(base_model, "base_model")
        positive_int(lora_rank, "lora_rank", zero=True)
        if lora_alpha is not None:
            positive_int(lora_alpha, "lora_alpha")
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("at least one of train_mlp, train_attn, train_unembed must be True")
        key = _wire.ModelSpec(
            base_model=base_model,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha if lora_rank > 0 else None,
            lora_seed=seed,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
        )
        self._check_open()
        if key in self._training_keys:
            raise ValueError(
                f"A training client for {base_model!r} (lora_rank={lora_rank}) already exists "
                "on this service client; reuse it, or pass a different seed (or, for "
                "LoRA, lora_alpha) to create another model"
            )
        # Reserved before the first await, so two concurrent calls cannot both pass.
        self._training_keys[key] = None
        try:
            metadata = (
                self._user_metadata
                if user_metadata is None
                else string_map(user_metadata, "user_metadata")
            )
            client = await self._create_model(key, metadata)
        except BaseException:
            del self._training_keys[key]
            raise
        self._training_keys[key] = client
        return client

    async def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: Mapping[str, str] | None = None,
        *,
        alpha: int | None = 32,
    ) -> AsyncFiretitanTrainingClient:
        """Create a LoRA model and return its training client.

        `create_training_client` with a positive rank, in tinker's signature (the
        positional order of tinker's ``create_lora_training_client``): the same
        arguments, result and errors, with ``rank`` and ``alpha`` for ``lora_rank``
        and ``lora_alpha`` (``rank`` must be positive).
        """
        positive_int(rank, "rank")
        return await self.create_training_client(
            base_model,
            rank,
            user_metadata,
            seed=seed,
            train_mlp=train_mlp,
            train_attn=train_attn,
            train_unembed=train_unembed,
            lora_alpha=alpha,
        )

    async def create_base_training_client(self, base_model: str) -> AsyncFiretitanTrainingClient:
        """Create a frozen base model (for ``forward`` only, e.g. reference logprobs).

        Args:
            base_model: The base model.

        Returns:
            The training client of the frozen model.

        Raises:
            ValueError: An empty ``base_model``.
            RequestFailedError: The trainer could not create the model.
            ClientClosedError: The service client was closed.
        """
        non_empty_str(base_model, "base_model")
        return await self._create_model(
            _wire.ModelSpec(base_model=base_model, base_only=True), None
        )

    async def create_training_client_from_state(
        self, path: str, user_metadata: Mapping[str, str] | None = None
    ) -> AsyncFiretitanTrainingClient:
        """Create a model from a ``save_state`` checkpoint: its weights, a fresh optimizer.

        The model's base model and LoRA options are those of the model that saved the
        checkpoint (tinker's recommended way to start from a checkpoint).

        Args:
            path: A checkpoint path as `AsyncFiretitanTrainingClient.load_state` takes
                it: a name, ``cross_job://<job_id>/<name>``,
                ``tinker://<job_id>/weights/<name>`` or ``<account>/<job_id>/<name>``.
            user_metadata: String pairs recorded with the model; None uses the
                service client's.

        Returns:
            The training client, once the trainer has created and loaded the model.

        Raises:
            ValueError: An invalid path (checked before anything is sent).
            RequestFailedError: No such checkpoint, or the model could not be created.
            ClientClosedError: The service client was closed.
        """
        return await self._create_from_state(path, user_metadata, optimizer=False)

    async def create_training_client_from_state_with_optimizer(
        self, path: str, user_metadata: Mapping[str, str] | None = None
    ) -> AsyncFiretitanTrainingClient:
        """`create_training_client_from_state` (the same arguments, result and errors),
        with the checkpoint's optimizer state too: the way to resume an interrupted run.
        """
        return await self._create_from_state(path, user_metadata, optimizer=True)

    async def _create_from_state(
        self, path: str, user_metadata: Mapping[str, str] | None, *, optimizer: bool
    ) -> AsyncFiretitanTrainingClient:
        ref = _checkpoint_paths.parse_checkpoint_path(path)
        metadata = (
            string_map(user_metadata, "user_metadata")
            if user_metadata is not None
            else self._user_metadata
        )
        session_id, model_seq_id = await self._numbered(self._model_seqs)
        request = _wire.LoadWeightsRequest(
            path=str(ref),
            optimizer=optimizer,
            session_id=session_id,
            model_seq_id=model_seq_id,
            user_metadata=metadata,
        )
        payload, loaded = await self._future(endpoints.LOAD_WEIGHTS, request)
        model_id = loaded.model_id
        if not model_id:
            raise APIResponseValidationError(
                "load_weights resolved without a model_id", body=payload
            )
        info_request = _wire.GetInfoRequest(model_id=model_id)
        info = await self._transport.call(endpoints.GET_INFO, _wire.encode_request(info_request))
        spec = _wire.ModelSpec(
            base_model=info.model_data.model_name or "", lora_rank=info.lora_rank or 0
        )
        return self._adopt(model_id, spec, capabilities=payload)

    async def _create_model(
        self, spec: _wire.ModelSpec, user_metadata: dict[str, str] | None
    ) -> AsyncFiretitanTrainingClient:
        # model_seq_id counts every model this session creates (base-only included).
        session_id, model_seq_id = await self._numbered(self._model_seqs)
        request = _wire.CreateModelRequest(
            session_id=session_id,
            model_seq_id=model_seq_id,
            user_metadata=user_metadata,
            **attrs.asdict(spec),
        )
        kind = "CreateBaseModel" if spec.base_only else None
        _, created = await self._future(endpoints.CREATE_MODEL, request, kind)
        return self._adopt(created["model_id"], spec, capabilities=created)

    def _adopt(
        self, model_id: str, spec: _wire.ModelSpec, *, capabilities: Any
    ) -> AsyncFiretitanTrainingClient:
        """The training client of a model the trainer has just created."""
        self._check_open()
        client = AsyncFiretitanTrainingClient(
            service=self,
            transport=self._transport,
            model_id=model_id,
            spec=spec,
            capabilities=capabilities,
        )
        self._training_clients.append(client)
        return client

    async def _future(
        self,
        endpoint: endpoints.Endpoint[R],
        request: _wire.Request,
        request_type: str | None = None,
    ) -> tuple[Any, R]:
        """Submit a request answered by a future and wait for it (within the
        configuration's ``future_deadline``): its result as sent, and decoded.

        Args:
            request_type: What the polls send as ``X-Tinker-Request-Type``; None uses
                the endpoint's.
        """
        answer = await self._transport.post(endpoint.path, _wire.encode_request(request))
        request_id = ack_request_id(answer, endpoint.name)
        deadline = self.config.future_deadline
        try:
            async with asyncio.timeout(deadline):
                payload = await self._poller.wait(request_id, request_type or endpoint.request_type)
        except TimeoutError:
            raise FutureTimeoutError(
                f"{endpoint.name} did not finish within {deadline} s"
            ) from None
        return payload, decode_result(endpoint, payload, request_id=request_id)

    # ------------------------------------------------------------------ sampling, info

    async def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> AsyncSamplingClient:
        """A sampling client on a sampler export (or, on a trainer, a base model).

        With a deployment configured, the export is hot-loaded into it unless every
        replica already serves it (a delta only if the deployment holds the export it
        applies to), and the client samples from the deployment. Otherwise it opens a
        sampling session on the trainer.

        Args:
            model_path: The path of a sampler export (from
                ``save_weights_for_sampler``); on a deployment, its snapshot identity
                (the last segment of a ``tinker://`` path).
            base_model: A base model name, to sample from the base weights (trainer
                only); on a deployment, the model it serves, if not configured.

        Returns:
            A sampling client that shares this service client's connections.

        Raises:
            ValueError: Neither ``model_path`` nor ``base_model`` was given (or no
                ``model_path`` for a deployment).
            APIStatusError: The trainer refused (e.g. an unknown path).
            HotLoadError: The deployment did not load the export.
            ClientClosedError: The service client was closed.
        """
        if not model_path and not base_model:
            raise ValueError("give model_path or base_model")
        if self._deployment is not None:
            return await self._deployment_sampling_client(model_path, base_model)
        session_id, seq = await self._numbered(self._sampling_seqs)
        request = _wire.CreateSamplingSessionRequest(
            session_id=session_id,
            sampling_session_seq_id=seq,
            base_model=base_model,
            model_path=model_path,
        )
        answer = await self._transport.call(
            endpoints.CREATE_SAMPLING_SESSION, _wire.encode_request(request)
        )
        sampling_session_id = answer.sampling_session_id
        if not sampling_session_id:
            raise APIResponseValidationError(
                "create_sampling_session answered an empty sampling_session_id"
            )
        exporter = self._exporter(snapshot_identity(model_path))[0] if model_path else None
        return self._track(
            AsyncSamplingClient._attached(
                self._sampling_parent(exporter),
                self._transport,
                model_path=model_path,
                base_model=base_model,
                sampling_session_id=sampling_session_id,
            )
        )

    async def _deployment_sampling_client(
        self, model_path: str | None, base_model: str | None
    ) -> AsyncSamplingClient:
        deployment = self._deployment
        assert deployment is not None
        self._check_open()
        if not model_path:
            raise ValueError(
                "a deployment samples hot-loaded snapshots: give model_path (a sampler "
                "export); to sample base weights, export them first"
            )
        identity = snapshot_identity(model_path)
        owner, previous = self._exporter(identity)
        if owner is not None:
            base_model = base_model or owner.base_model
        await deployment.hot_load(
            identity, previous=previous, base_model=base_model, unless_serving=True
        )
        return self._track(
            AsyncSamplingClient._on_deployment(
                self._sampling_parent(owner),
                AsyncDeploymentSampler(deployment),
                model_path=model_path,
                base_model=base_model,
                config=self.config,
            )
        )

    def _track(self, client: AsyncSamplingClient) -> AsyncSamplingClient:
        """``client``, kept (weakly: a sampling client nobody holds needs no shutdown)
        for `aclose` to shut down."""
        self._sampling_clients.add(client)
        return client

    def _sampling_parent(self, exporter: AsyncFiretitanTrainingClient | None) -> Parent:
        """What a sampling client asks of this service client; ``exporter`` made the
        snapshot it samples (its trainer names the tokenizer if none is configured)."""
        return Parent(
            check_open=self._check_open,
            tokenizer=functools.partial(self._tokenizer_for, exporter),
        )

    def _exporter(self, identity: str) -> tuple[AsyncFiretitanTrainingClient | None, str | None]:
        """The training client that exported snapshot ``identity``, and the snapshot it
        is a delta on (None for a base, or for a snapshot no client here made)."""
        for training in self._training_clients:
            known, previous = training.delta_base(identity)
            if known:
                return training, previous
        return None, None

    async def _tokenizer_for(self, client: AsyncFiretitanTrainingClient | None) -> Any:
        """The configured tokenizer, else the one ``client``'s trainer names."""
        name = self._tokenizer_name
        if name is None:
            if client is None:
                raise ClientUsageError(
                    "no tokenizer is known for this sampling client: configure one "
                    "(tokenizer= on the service client or in its DeploymentConfig)"
                )
            info = await client.get_info()
            name = info.model_data.tokenizer_id
            if not name:
                raise ClientUsageError(
                    "the trainer names no tokenizer for this model: configure one "
                    "(tokenizer= on the service client)"
                )
        if name not in self._tokenizers:
            self._tokenizers[name] = await asyncio.to_thread(load_tokenizer, name)
        return self._tokenizers[name]

    async def get_server_capabilities(self) -> ttypes.GetServerCapabilitiesResponse:
        """Ask the trainer which models it serves.

        Returns:
            The supported models (name, context length).

        Raises:
            APIError: The trainer could not answer.
            ClientClosedError: The service client was closed.
        """
        self._check_open()
        return await self._transport.call(endpoints.GET_SERVER_CAPABILITIES)


def snapshot_identity(model_path: str) -> str:
    """The hot-load identity of a sampler export's path: the path itself, or the last
    segment of a ``tinker://<job>/sampler_weights/<name>`` path."""
    if model_path.startswith("tinker://"):
        return model_path.rstrip("/").rsplit("/", 1)[-1]
    return model_path


def _session_id(answer: ttypes.CreateSessionResponse) -> str:
    """The new session's id; logs what the trainer had to say about it."""
    if not answer.session_id:
        raise APIResponseValidationError("create_session answered an empty session_id")
    for level, message in (
        (logging.INFO, answer.info_message),
        (logging.WARNING, answer.warning_message),
        (logging.ERROR, answer.error_message),
    ):
        if message:
            log.log(level, "firetitan: trainer says: %s", message)
    return answer.session_id
