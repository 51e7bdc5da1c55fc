"""What each accepted request does: engine calls, checkpoint bookkeeping, result payloads.

Every public method returns a `Run` for the executor: a coroutine function that does its
computing and file I/O on the engine thread (`Executor.in_engine`) and returns the
serialized success payload (wire.md §3.7-§3.17). Mistakes the client made raise
`UserError` (category ``user``); anything else fails the request with category
``server``. Bookkeeping that the event loop reads (model state, last export) is updated
on the loop after the engine call returns, so it needs no locks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import tinker

from firetitan import _wire
from firetitan.local.checkpoints import MANIFEST_NAME, CheckpointStore, Kind, Manifest
from firetitan.local.engine import Engine, ModelSpec, SampleSource, UserError
from firetitan.local.executor import Executor, Run, success_body
from firetitan.local.sessions import ModelRecord, Registry, SamplingSession

__all__ = ["CREATE_MODEL_CAPABILITIES", "Operations"]

#: Capability fields of the create_model result (wire.md §3.7). Only real booleans
#: count; everything the local trainer does not implement is advertised as false, so
#: clients never send the options those flags gate.
CREATE_MODEL_CAPABILITIES: dict[str, Any] = {
    "comms": "v2",
    "supports_router_replay": False,
    "supports_target_logprob_support": False,
    "supports_reinforce": False,
    "supports_score_centering": False,
    "supports_policy_importance_sampling": False,
    "supports_policy_diagnostics": False,
    "supports_rdma_weight_sync": False,
}

SAMPLER_CHECKPOINT_TYPES = ("base", "delta")


class Operations:
    """Builds the work of each request kind for one trainer."""

    def __init__(
        self, engine: Engine, store: CheckpointStore, registry: Registry, executor: Executor
    ) -> None:
        self._engine = engine
        self._store = store
        self._registry = registry
        self._executor = executor

    # ------------------------------------------------------------------ models

    def create_model(self, record: ModelRecord) -> Run:
        """``create_model``: the model's first job (seq_id 0)."""

        def work() -> tuple[bytes, ModelSpec]:
            self._engine.create_model(record.model_id, record.spec)
            payload = {"type": "create_model", "model_id": record.model_id}
            return success_body({**payload, **CREATE_MODEL_CAPABILITIES}), record.spec

        return self._creation(record, work)

    def create_from_checkpoint(
        self, record: ModelRecord, path: str, with_optimizer: bool, base_model: str | None
    ) -> Run:
        """tinker's create-via-load: a ``load_weights`` that creates its model first.

        The model's options (LoRA rank and targets) come from the checkpoint, which
        records the spec of the model that saved it.
        """

        def work() -> tuple[bytes, ModelSpec]:
            directory, manifest = self._resolve("state", path, "path")
            saved = manifest.metadata.get("model_spec")
            missing = UserError(f"path: checkpoint {path!r} does not record its model's options")
            if not isinstance(saved, Mapping):
                raise missing
            try:
                spec = ModelSpec(**{**saved, **({"base_model": base_model} if base_model else {})})
            except TypeError as exc:  # written by another version, with other fields
                raise missing from exc
            self._engine.create_model(record.model_id, spec)
            try:
                self._engine.load_state(record.model_id, directory, with_optimizer=with_optimizer)
            except BaseException:
                self._engine.unload_model(record.model_id)
                raise
            payload = {"type": "load_weights", "path": path, "model_id": record.model_id}
            return success_body(payload), spec

        return self._creation(record, work)

    def _creation(self, record: ModelRecord, work: Callable[[], tuple[bytes, ModelSpec]]) -> Run:
        async def run() -> bytes:
            try:
                body, spec = await self._executor.in_engine(work)
            except BaseException as exc:
                record.state = "failed"
                record.failure = str(exc)
                raise
            record.spec = spec
            record.state = "ready"
            return body

        return run

    async def get_info(self, model_id: str) -> dict[str, Any]:
        """The direct ``get_info`` answer."""
        info = await self._executor.in_engine(functools.partial(self._engine.get_info, model_id))
        return {"type": "get_info", "model_id": model_id, **info}

    def unload(self, model_id: str, reason: str) -> Run:
        """``unload_model`` (also used when a session expires or finishes)."""

        async def run() -> bytes:
            await self._executor.close_model(model_id, reason)
            try:
                await self._executor.in_engine(
                    functools.partial(self._engine.unload_model, model_id)
                )
            finally:
                self._registry.remove_model(model_id)
            return success_body({"type": "unload_model", "model_id": model_id})

        return run

    # ------------------------------------------------------------------ training

    def forward(self, request: _wire.ForwardRequest) -> Run:
        """``forward`` or ``forward_backward`` (``request.forward_only`` tells which)."""
        compute = self._engine.forward if request.forward_only else self._engine.forward_backward

        def work() -> bytes:
            output = compute(
                request.model_id, list(request.data), request.loss_fn, request.loss_fn_config
            )
            if len(output.loss_fn_outputs) != len(request.data):
                raise RuntimeError(
                    f"engine returned {len(output.loss_fn_outputs)} outputs for "
                    f"{len(request.data)} datums"
                )
            return success_body(_wire.encode_forward_backward_output(output))

        return self._model_run(request.model_id, work)

    def optim_step(self, request: _wire.OptimStepRequest) -> Run:
        def work() -> bytes:
            metrics = self._engine.optim_step(
                request.model_id, request.adam_params, request.grad_accumulation_normalization
            )
            return success_body({"metrics": {k: float(v) for k, v in metrics.items()}})

        return self._model_run(request.model_id, work)

    # ------------------------------------------------------------------ checkpoints

    def save_weights(self, request: _wire.SaveWeightsRequest, record: ModelRecord) -> Run:
        """``save_weights`` (save_state): returns the bare name, which loads back."""

        def work() -> bytes:
            # The spec goes into the manifest so that create-via-load can rebuild the model.
            metadata = {"model_spec": attrs.asdict(record.spec)}
            with self._store.write(
                "state",
                request.path,
                model_id=request.model_id,
                ttl_seconds=request.ttl_seconds,
                metadata=metadata,
            ) as directory:
                self._engine.save_state(request.model_id, directory)
            return success_body({"type": "save_weights", "path": request.path})

        return self._model_run(request.model_id, work)

    def load_weights(self, request: _wire.LoadWeightsRequest) -> Run:
        """``load_weights``: a bare name or ``cross_job://job/name``, resolved when it runs
        (a save queued just before it must be found)."""

        model_id = request.target_model_id

        def work() -> bytes:
            directory, _manifest = self._resolve("state", request.path, "path")
            self._engine.load_state(model_id, directory, with_optimizer=request.optimizer)
            return success_body({"type": "load_weights", "path": request.path})

        return self._model_run(model_id, work)

    def save_for_sampler(
        self,
        request: _wire.SaveWeightsForSamplerRequest,
        record: ModelRecord,
        name: str,
        *,
        client_metadata: Any = None,
        sampling_session: SamplingSession | None = None,
    ) -> Run:
        """``save_weights_for_sampler``: a ``base`` or ``delta`` export under ``name``.

        ``delta`` is computed against this model's previous export; with none (or with
        that export deleted) it falls back to ``base`` and records why in the manifest.
        """
        requested = (request.checkpoint_type or "base").lower()

        def work(previous: Path | None) -> tuple[bytes, Path]:
            if requested not in SAMPLER_CHECKPOINT_TYPES:
                raise UserError(
                    f"checkpoint_type {requested!r} is not supported by the local trainer; "
                    f"use one of {list(SAMPLER_CHECKPOINT_TYPES)}"
                )
            if previous is not None and not (previous / MANIFEST_NAME).is_file():
                previous = None  # expired or deleted since
            actual = "delta" if requested == "delta" and previous is not None else "base"
            metadata: dict[str, Any] = {
                "checkpoint_type": actual,
                "requested_checkpoint_type": requested,
            }
            if actual != requested:
                metadata["fallback_reason"] = "no previous export of this model to diff against"
            if client_metadata is not None:
                metadata["client_metadata"] = client_metadata
            # The store reads `metadata` when it commits, after the engine has written.
            with self._store.write(
                "sampler",
                name,
                model_id=request.model_id,
                ttl_seconds=request.ttl_seconds,
                metadata=metadata,
            ) as directory:
                engine_meta = self._engine.save_for_sampler(
                    request.model_id, directory, actual, previous if actual == "delta" else None
                )
                metadata["engine"] = engine_meta
            export_dir, _manifest = self._store.resolve("sampler", name)
            payload: dict[str, Any] = {"type": "save_weights_for_sampler", "path": name}
            if sampling_session is not None:
                payload["sampling_session_id"] = sampling_session.sampling_session_id
            return success_body(payload), export_dir

        async def run() -> bytes:
            self._check_model(request.model_id)
            body, export_dir = await self._executor.in_engine(
                functools.partial(work, record.last_export)
            )
            record.last_export = export_dir
            return body

        return run

    # ------------------------------------------------------------------ sampling

    def sample(self, request: _wire.SampleRequest, sampling: SamplingSession | None) -> Run:
        """``asample``: from a sampler export (by name) or a base model."""
        model_path = request.model_path or (sampling.model_path if sampling else None)
        base_model = request.base_model or (sampling.base_model if sampling else None)

        def work() -> bytes:
            if model_path is not None:
                directory, _manifest = self._resolve("sampler", model_path, "model_path")
                source = SampleSource(export_dir=directory)
            elif base_model is not None:
                source = SampleSource(base_model=base_model)
            else:
                raise UserError("one of model_path, base_model or sampling_session_id is required")
            try:
                prompt = request.prompt.to_ints()
            except ValueError as exc:
                raise UserError("prompt: only encoded_text chunks can be sampled from") from exc
            response: tinker.SampleResponse = self._engine.sample(
                source,
                prompt,
                request.num_samples,
                request.sampling_params,
                prompt_logprobs=request.prompt_logprobs,
            )
            return success_body(_wire.encode_sample_response(response))

        async def run() -> bytes:
            body: bytes = await self._executor.in_engine(work)
            return body

        return run

    def sweep(self) -> list[str]:
        """Delete expired checkpoints (engine thread: it touches checkpoint folders)."""
        return self._store.sweep()

    # ------------------------------------------------------------------ helpers

    def _model_run(self, model_id: str, work: Any) -> Run:
        async def run() -> bytes:
            self._check_model(model_id)
            body: bytes = await self._executor.in_engine(work)
            return body

        return run

    def _check_model(self, model_id: str) -> None:
        record = self._registry.models.get(model_id)
        if record is not None and record.state == "failed":
            raise UserError(f"model {model_id!r} could not be created: {record.failure}")

    def _resolve(self, kind: Kind, path: str, field: str) -> tuple[Path, Manifest]:
        try:
            return self._store.resolve(kind, path)
        except (ValueError, FileNotFoundError) as exc:
            raise UserError(f"{field}: {exc}") from exc
