"""What each accepted request does: engine calls, checkpoint bookkeeping, result payloads.

Every public method returns a `Run` for the executor: a coroutine function that does its
computing and file I/O on the engine thread (`Executor.in_engine`) and returns the
success `Result` (wire.md §3.7-§3.17). Forward and sampling results keep their object
and offer protobuf besides JSON (tinker 0.38 reads them only as protobuf); the encoding
the submitting client will likely poll for is made at once, on the engine thread.
Mistakes the client made raise `UserError` (category ``user``); anything else fails the
request with category ``server``. Bookkeeping that the event loop reads (model state,
last export) is updated on the loop after the engine call returns, so it needs no locks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import attrs
import numpy.typing as npt
import tinker

from firetitan import _wire
from firetitan._checkpoint_paths import CheckpointRef
from firetitan.local import loss_graphs, rules, sample_scores, stability
from firetitan.local.checkpoints import MANIFEST_NAME, CheckpointStore, Kind, Manifest
from firetitan.local.engine import Engine, ModelSpec, SampleSource, UserError
from firetitan.local.executor import (
    Encoding,
    Executor,
    Result,
    Run,
    success_json,
    success_result,
)
from firetitan.local.external import ExternalRequest, encrypt_files
from firetitan.local.loss_graphs import LossGraph
from firetitan.local.rules import check_export_kind
from firetitan.local.sessions import ModelRecord, Registry, SamplingSession
from firetitan.local.tinker.compat import mask_prompt_logprobs

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


# The two result types tinker 0.38 reads only as protobuf, and how each is encoded.
_FORWARD_ENCODERS: Final[dict[Encoding, Callable[[Any], bytes]]] = {
    "json": lambda output: success_json(_wire.encode_forward_backward_output(output)),
    "protobuf": _wire.encode_forward_backward_output_proto,
}
_SAMPLE_ENCODERS: Final[dict[Encoding, Callable[[Any], bytes]]] = {
    "json": lambda response: success_json(_wire.encode_sample_response(response)),
    "protobuf": _wire.encode_sample_response_proto,
}


def _two_way_result(
    value: Any, encoders: Mapping[Encoding, Callable[[Any], bytes]], expect: Encoding
) -> Result:
    """A result offering both encodings, with ``expect`` made now (on the engine
    thread), so that one the protocol cannot express fails its request here."""
    result = Result(value, encoders)
    result.encode(expect)
    return result


def _model_metadata(record: ModelRecord) -> dict[str, Any]:
    # Recorded in every checkpoint manifest: create-via-load rebuilds the model from
    # it, a sampler's base model is read from it, and tinker's REST view reports the
    # training run's user_metadata from it.
    metadata: dict[str, Any] = {"model_spec": attrs.asdict(record.spec)}
    if record.user_metadata:
        metadata["user_metadata"] = dict(record.user_metadata)
    return metadata


class _Saving(Protocol):
    """A request that saves a checkpoint of a model."""

    @property
    def model_id(self) -> str: ...

    @property
    def ttl_seconds(self) -> int | None: ...


@attrs.define
class SampleTicket:
    """Who asked for a sample, its request id and the sequence ids its ACK hands out.
    The server fills the ids right after submitting, before the work can start (the
    executor runs it in a task of its own, on the next turn of the loop)."""

    session_id: str | None
    sequence_ids: list[str] = attrs.field(factory=list)
    request_id: str = ""


class Operations:
    """Builds the work of each request kind for one trainer."""

    def __init__(
        self, engine: Engine, store: CheckpointStore, registry: Registry, executor: Executor
    ) -> None:
        self._engine = engine
        self._store = store
        self.stability = stability.StabilityRecords()
        self._registry = registry
        self._executor = executor

    @property
    def engine(self) -> Engine:
        """The engine the work runs on."""
        return self._engine

    # ------------------------------------------------------------------ models

    def create_model(self, record: ModelRecord) -> Run:
        """``create_model``: the model's first job (seq_id 0)."""

        def work() -> tuple[Result, ModelSpec]:
            self._check_served(record.spec.base_model)
            self._engine.create_model(record.model_id, record.spec)
            payload = {"type": "create_model", "model_id": record.model_id}
            return success_result({**payload, **CREATE_MODEL_CAPABILITIES}), record.spec

        return self._creation(record, work)

    def create_from_checkpoint(
        self,
        record: ModelRecord,
        request: _wire.LoadWeightsRequest,
        store_path: str,
    ) -> Run:
        """tinker's create-via-load: a ``load_weights`` that creates its model first.

        The model's options (LoRA rank and targets) come from the checkpoint, which
        records the spec of the model that saved it; ``request.base_model`` may
        override the base model's name.

        Args:
            record: The model to create.
            request: The request (its ``path`` is echoed back as the client sent it).
            store_path: ``request.path`` in the form the checkpoint store resolves.
        """
        path, base_model = request.path, request.base_model

        def work() -> tuple[Result, ModelSpec]:
            directory, manifest = self._resolve("state", store_path, "path")
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
                self._engine.load_state(
                    record.model_id, directory, with_optimizer=request.optimizer
                )
            except BaseException:
                self._engine.unload_model(record.model_id)
                raise
            payload = {"type": "load_weights", "path": path, "model_id": record.model_id}
            return success_result(payload), spec

        return self._creation(record, work)

    def _creation(self, record: ModelRecord, work: Callable[[], tuple[Result, ModelSpec]]) -> Run:
        async def run() -> Result:
            try:
                result, spec = await self._executor.in_engine(work)
            except BaseException as exc:
                record.state = "failed"
                record.failure = str(exc)
                raise
            record.spec = spec
            record.state = "ready"
            return result

        return run

    async def get_info(self, model_id: str) -> dict[str, Any]:
        """The direct ``get_info`` answer."""
        info = await self._executor.in_engine(functools.partial(self._engine.get_info, model_id))
        return {"type": "get_info", "model_id": model_id, **info}

    def unload(self, model_id: str, reason: str) -> Run:
        """``unload_model`` (also used when a session expires or finishes)."""

        async def run() -> Result:
            await self._executor.close_model(model_id, reason)
            try:
                await self._executor.in_engine(
                    functools.partial(self._engine.unload_model, model_id)
                )
            finally:
                self._registry.remove_model(model_id)
            return success_result({"type": "unload_model", "model_id": model_id})

        return run

    # ------------------------------------------------------------------ training

    def forward(self, request: _wire.ForwardRequest, record: ModelRecord, expect: Encoding) -> Run:
        """``forward`` or ``forward_backward`` (``request.forward_only`` tells which).

        ``expect`` is the encoding the client will likely poll for (made at once).
        ``stable_reinforce`` data get their sampler logprobs from the stability records
        of the model's session; a ``custom`` request runs the loss the model's session
        uploaded (looked up now, on the event loop, which owns the registry).
        """
        compute = self._engine.forward if request.forward_only else self._engine.forward_backward
        graph: LossGraph | None = None
        refusal: UserError | None = None
        if request.loss_fn == loss_graphs.LOSS_FN:
            try:
                loss_id = rules.check_custom_config(request.loss_fn_config)
                graph = self._registry.custom_loss(record.session_id, loss_id)
            except UserError as exc:
                refusal = exc  # fails the request in its turn, as every user error does

        def work() -> Result:
            if refusal is not None:
                raise refusal
            data = list(request.data)
            if request.loss_fn == stability.LOSS:
                data = self.stability.resolve(record.session_id, data)
            # Only a custom request passes its graph: an engine subclass written against
            # the four-argument methods keeps serving the built-in losses.
            uploaded = {} if graph is None else {"graph": graph}
            output = compute(
                request.model_id, data, request.loss_fn, request.loss_fn_config, **uploaded
            )
            if len(output.loss_fn_outputs) != len(request.data):
                raise RuntimeError(
                    f"engine returned {len(output.loss_fn_outputs)} outputs for "
                    f"{len(request.data)} datums"
                )
            return _two_way_result(output, _FORWARD_ENCODERS, expect)

        return self._model_run(request.model_id, work)

    def create_custom_loss(self, request: _wire.CreateCustomLossRequest) -> Run:
        """``create_custom_loss``: check the uploaded graph as a whole and keep it for its
        session; the result names it by ``loss_id``.

        The check runs now, on the event loop (it is pure and bounded by
        `loss_graphs.MAX_NODES`); a graph it refuses fails the future with category
        ``user``, naming the node and its target.
        """
        loss_id = loss_graphs.loss_id_of(request.session_id, request.custom_loss_seq_id)
        refusal: UserError | None = None
        try:
            graph = loss_graphs.check_graph(
                loss_id=loss_id,
                session_id=request.session_id,
                name=request.name,
                inputs=request.inputs,
                graph=request.graph,
            )
            self._registry.add_custom_loss(graph)
        except UserError as exc:
            refusal = exc

        async def run() -> Result:
            if refusal is not None:
                raise refusal
            return success_result({"type": "create_custom_loss", "loss_id": loss_id})

        return run

    def optim_step(self, request: _wire.OptimStepRequest) -> Run:
        def work() -> Result:
            metrics = self._engine.optim_step(
                request.model_id, request.adam_params, request.grad_accumulation_normalization
            )
            return success_result({"metrics": {k: float(v) for k, v in metrics.items()}})

        return self._model_run(request.model_id, work)

    # ------------------------------------------------------------------ checkpoints

    def _write(
        self, kind: Kind, name: str, request: _Saving, metadata: dict[str, Any]
    ) -> contextlib.AbstractContextManager[Path]:
        """The store's write of a checkpoint that ``request`` saves: for its model, with
        its TTL; ``metadata`` is read when the checkpoint is committed."""
        return self._store.write(
            kind,
            name,
            model_id=request.model_id,
            ttl_seconds=request.ttl_seconds,
            metadata=metadata,
        )

    def save_weights(
        self, request: _wire.SaveWeightsRequest, record: ModelRecord, returned_path: str
    ) -> Run:
        """``save_weights`` (save_state) under the name ``request.path``.

        A checkpoint of that name that this model saved is replaced only with
        ``request.overwrite`` (tinker's default refuses it). One trainer job is one
        namespace where tinker gives every training run its own, so a name another
        model saved is replaced as before: several runs of a loop (tinker-cookbook's
        resumed runs, say) save the same names.

        ``returned_path`` is the path the client gets back, which it can load: the bare
        name, or its ``tinker://`` form for tinker sessions.
        """

        def work() -> Result:
            metadata = _model_metadata(record)
            if request.user_metadata is not None:  # the checkpoint's own
                metadata["checkpoint_user_metadata"] = dict(request.user_metadata)
            existing = self._store.manifest("state", CheckpointRef(request.path))
            if not request.overwrite and existing and existing.model_id == request.model_id:
                raise UserError(  # tinker's default: never replace a run's own silently
                    f"save_state: this model already saved a checkpoint named "
                    f"{request.path!r}; pass overwrite=True to replace it, or choose another name"
                )
            with self._write("state", request.path, request, metadata) as directory:
                self._engine.save_state(request.model_id, directory)
            return success_result({"type": "save_weights", "path": returned_path})

        return self._model_run(request.model_id, work)

    def save_external(
        self, request: ExternalRequest, record: ModelRecord, returned_path: str
    ) -> Run:
        """``save_weights_external``: the model's weights in sampler-export form, for
        download (`firetitan.local.external`), encrypted when recipients are given."""

        def work() -> Result:
            metadata = {**_model_metadata(record), "encrypted": bool(request.recipients)}
            with self._write("external", request.path, request, metadata) as directory:
                self._engine.save_for_sampler(request.model_id, directory, "base", None)
                if request.recipients:
                    encrypt_files(directory, request.recipients)
            files = self._store.files("external", request.path).values()
            size = sum(p.stat().st_size for p in files)
            return success_result(
                {"type": "save_weights_external", "path": returned_path, "size_bytes": size}
            )

        return self._model_run(request.model_id, work)

    def load_weights(self, request: _wire.LoadWeightsRequest, store_path: str) -> Run:
        """``load_weights`` from ``store_path`` (``request.path`` as the store resolves
        it), resolved when it runs: a save queued just before it must be found."""

        model_id = request.target_model_id

        def work() -> Result:
            directory, _manifest = self._resolve("state", store_path, "path")
            self._engine.load_state(model_id, directory, with_optimizer=request.optimizer)
            return success_result({"type": "load_weights", "path": request.path})

        return self._model_run(model_id, work)

    def save_for_sampler(
        self,
        request: _wire.SaveWeightsForSamplerRequest,
        record: ModelRecord,
        name: str,
        returned_path: str,
        *,
        client_metadata: Any = None,
        sampling_session: SamplingSession | None = None,
    ) -> Run:
        """``save_weights_for_sampler``: a ``base`` or ``delta`` export under ``name``,
        answered with ``returned_path`` (the name in the session's path style).

        ``delta`` is the difference to this model's previous export on this trainer,
        which the manifest names (``delta_of``). With none (the model's first export, as
        after a resume, or that export deleted) there is nothing every reader holds to
        apply a difference to, so the export holds the full weights instead: it loads to
        exactly the current weights, and the manifest says ``checkpoint_type: base``,
        ``requested_checkpoint_type: delta`` and why. So it does when ``name`` is that
        previous export: once committed, the delta would be a difference to itself. A
        name that live delta exports are built on is never replaced (the TTL sweep keeps
        what they need, `CheckpointStore.sweep`).
        """
        requested = (request.checkpoint_type or "base").lower()

        def work(previous: Path | None) -> tuple[Result, Path]:
            check_export_kind(requested, self._engine.name, self._engine.checkpoint_types)
            dependents = [d for d in self._store.dependents(name) if d != name]
            if dependents:
                raise UserError(
                    f"sampler export {name!r} cannot be replaced: the delta export(s) "
                    f"{', '.join(map(repr, dependents))} are built on it; save under "
                    "another name"
                )
            fallback = (
                "no previous export of this model to diff against: written with the "
                "full weights, which load to exactly the current weights"
            )
            if previous is not None and not (previous / MANIFEST_NAME).is_file():
                previous = None  # expired or deleted since
            elif previous is not None and previous.name == name:
                # A delta on the export it replaces would reference itself once committed.
                previous = None
                fallback = (
                    f"it replaces {name!r}, the export it would be a difference to: written "
                    "with the full weights, which load to exactly the current weights"
                )
            actual = "base" if requested == "delta" and previous is None else requested
            metadata: dict[str, Any] = {
                "checkpoint_type": actual,
                "requested_checkpoint_type": requested,
                # The export this one is a difference to; None: it holds full weights.
                "delta_of": previous.name if actual == "delta" and previous else None,
                **_model_metadata(record),
            }
            if actual != requested:
                metadata["fallback_reason"] = fallback
            if client_metadata is not None:
                metadata["client_metadata"] = client_metadata
            # The store reads `metadata` when it commits, after the engine has written.
            with self._write("sampler", name, request, metadata) as directory:
                engine_meta = self._engine.save_for_sampler(
                    request.model_id, directory, actual, previous if actual == "delta" else None
                )
                metadata["engine"] = engine_meta
            export_dir, _manifest = self._store.resolve("sampler", name)
            payload: dict[str, Any] = {"type": "save_weights_for_sampler", "path": returned_path}
            if sampling_session is not None:
                payload["sampling_session_id"] = sampling_session.sampling_session_id
            return success_result(payload), export_dir

        async def run() -> Result:
            self._check_model(request.model_id)
            result, export_dir = await self._executor.in_engine(
                functools.partial(work, record.last_export)
            )
            record.last_export = export_dir
            return result

        return run

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        request: _wire.SampleRequest,
        *,
        model_path: str | None,
        base_model: str | None,
        expect: Encoding,
        ticket: SampleTicket,
    ) -> Run:
        """``asample``: from a sampler export or a base model.

        Args:
            request: The request.
            model_path: The export to sample from, in the form the store resolves.
            base_model: The base model to sample from when there is no export.
            expect: The encoding the client will likely poll for (made at once).
            ticket: Who sampled and the sequence ids handed out, for the stability
                records ``record_stability_info`` asks for.
        """

        def work() -> Result:
            if model_path is not None:
                directory, _manifest = self._resolve("sampler", model_path, "model_path")
                source = SampleSource(export_dir=directory)
            elif base_model is not None:
                self._check_served(base_model)
                source = SampleSource(base_model=base_model)
            else:
                raise UserError("one of model_path, base_model or sampling_session_id is required")
            response = self._engine.sample(source, request)
            if request.record_stability_info:
                if ticket.session_id is None:
                    raise UserError(
                        "record_stability_info needs a sampling session (sampling_session_id)"
                    )
                self.stability.record(
                    ticket.session_id, ticket.sequence_ids, request.prompt.to_ints(), response
                )
            response = _last_n_prompt_logprobs(response, request.prompt_logprobs_last_n)
            return _two_way_result(response, _SAMPLE_ENCODERS, expect)

        async def run() -> Result:
            result: Result = await self._executor.in_engine(work)
            return result

        return run

    def _check_served(self, base_model: str) -> None:
        """Refuse a base model the engine does not serve, naming those it does.

        A stand-in of another model would train and sample without complaint, and
        nothing it produced would mean anything for the model that was asked for.
        """
        served = [str(m["model_name"]) for m in self._engine.supported_models()]
        if base_model not in served:
            raise UserError(
                f"base_model {base_model!r} is not served by this trainer; it serves "
                + ", ".join(repr(name) for name in served)
            )

    def sampler_base_model(self, sampling: SamplingSession) -> str:
        """The base model a sampling session samples from. Reads the export's manifest
        when the session samples from an export, so call it off the event loop.

        Raises:
            UserError: The export is missing or does not record its model.
        """
        if sampling.model_path is None:
            return sampling.base_model or ""
        _directory, manifest = self._resolve("sampler", sampling.model_path, "model_path")
        spec = manifest.metadata.get("model_spec")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("base_model"), str):
            raise UserError(f"sampler export {sampling.model_path!r} does not record its model")
        return str(spec["base_model"])

    def sweep(self) -> list[str]:
        """Delete expired checkpoints (engine thread: it touches checkpoint folders)."""
        return self._store.sweep()

    # ------------------------------------------------------------------ helpers

    def _model_run(self, model_id: str, work: Callable[[], Result]) -> Run:
        async def run() -> Result:
            self._check_model(model_id)
            return await self._executor.in_engine(work)

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


def _last_n_prompt_logprobs(
    response: tinker.SampleResponse, last_n: int | None
) -> tinker.SampleResponse:
    """Blank the prompt logprobs and top-k rows before the last ``last_n`` (tinker's
    ``prompt_logprobs_last_n``; tinker refuses a response that scores earlier ones).

    Raises:
        WireError: ``last_n`` does not fit the prompt.
    """
    if last_n is None:
        return response
    scored: npt.ArrayLike
    if response.prompt_logprobs_np is not None:
        scored = response.prompt_logprobs_np
    elif response.prompt_logprobs is not None:
        scored = [float("nan") if v is None else v for v in response.prompt_logprobs]
    else:
        return response
    top = response.topk_prompt_logprobs_np
    return dataclasses.replace(
        response,
        prompt_logprobs_np=mask_prompt_logprobs(scored, last_n),
        _prompt_logprobs_list=None,
        topk_prompt_logprobs_np=None if top is None else sample_scores.mask_topk_rows(top, last_n),
    )
