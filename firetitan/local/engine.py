"""The engine interface: what the local trainer's protocol server asks of a model backend.

The server (``server.py``) speaks HTTP and the executor (``executor.py``) decides *when*
each request runs; an engine decides *what* it computes. Two engines implement this:

* ``NullEngine`` (``null_engine.py``): no model; right shapes, deterministic values.
* ``TorchEngine`` (``torch/``): real transformers models, losses and AdamW.

Engines only compute. What a request may ask for is decided once, for every engine, in
``rules.py``: the public methods of `Engine` run those checks (unknown model, frozen
model, loss catalogue and datums, Adam, sampling) and then call the engine's compute
hooks (`build_model`, `compute_loss`, `compute_optim_step`, `compute_sample`) with
checked inputs, so every engine refuses the same requests with the same messages.

Engine methods are plain synchronous functions. The executor calls them from one worker
thread, one request at a time per model, in ``seq_id`` order, so an engine needs no
locking of its own and never runs on the event loop.

Errors: raise `UserError` for a mistake in the request that only the engine can see (a
checkpoint that does not fit the model, a non-finite loss from finite inputs); the
request then fails with category ``user`` and the engine's state must be unchanged
(nothing accumulated). Any other exception fails the request with category ``server``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import tinker

from firetitan._wire.requests import ModelSpec, SampleRequest
from firetitan.local import rules, sample_scores
from firetitan.local.loss_graphs import LossGraph, reduce_metrics
from firetitan.local.rules import Limits, LossRequest, SamplingRequest, UserError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Engine",
    "Limits",
    "LossRequest",
    "ModelSpec",
    "SampleSource",
    "SamplerExport",
    "SamplingRequest",
    "UserError",
    "optim_metrics",
]

#: A request's datums, as sent.
Data = Sequence[tinker.Datum]
#: A request's ``loss_fn_config``, as sent (None: the loss's defaults).
Config = Mapping[str, Any] | None
#: The uploaded loss a ``custom`` request names (`firetitan.local.loss_graphs`), if any.
Graph = LossGraph | None
#: The ``max_tokens`` a sampling request that leaves it unset gets (and is budgeted as).
DEFAULT_MAX_TOKENS = 256


def optim_metrics(
    *,
    step: int,
    learning_rate: float,
    loss_tokens: int,
    sequences: int,
    grad_norm: float | None = None,
) -> dict[str, float]:
    """The metrics an ``optim_step`` answers, named alike by every engine.

    Every key is ``name:reduction`` (wire.md §6.6) and none is a bare word a training
    loop uses for its own row (tinker-cookbook merges these into a row keyed by its own
    integer ``step``, ``learning_rate`` and ``optim/lr``): a key with a colon cannot
    overwrite them.
    """
    metrics = {
        "optim_step:max": float(step),
        "learning_rate:unique": float(learning_rate),
        "loss_tokens:sum": float(loss_tokens),
        "sequences:sum": float(sequences),
    }
    if grad_norm is not None:
        metrics["grad_norm:max"] = float(grad_norm)
    return metrics


@attrs.frozen(kw_only=True)
class SampleSource:
    """Which weights to sample from: exactly one of the three is set.

    Attributes:
        export_dir: A sampler export written by `Engine.save_for_sampler`.
        model_id: A live training model (its current weights).
        base_model: A base model name (fresh stand-in or the loaded weights).
    """

    export_dir: Path | None = None
    model_id: str | None = None
    base_model: str | None = None


@attrs.frozen(kw_only=True)
class SamplerExport:
    """A checked `Engine.save_for_sampler` request.

    Attributes:
        directory: Empty target directory, committed by the store afterwards.
        kind: One of the engine's `Engine.checkpoint_types`, lower-case.
        previous: The previous export of this model; set whenever ``kind`` is ``delta``.
    """

    directory: Path
    kind: str
    previous: Path | None


class Engine(abc.ABC):
    """A model backend for the local trainer. See the module docstring for the rules."""

    #: Short name, reported by ``get_server_capabilities`` and ``firetitan serve``.
    name: str = "engine"
    #: The ``checkpoint_type`` values `save_for_sampler` exports.
    checkpoint_types: tuple[str, ...] = ("base", "delta")

    @abc.abstractmethod
    def supported_models(self) -> list[dict[str, Any]]:
        """Entries for ``get_server_capabilities``: ``{"model_name", "max_context_length"}``."""

    @abc.abstractmethod
    def model_spec(self, model_id: str) -> ModelSpec | None:
        """The spec ``model_id`` was created with, or None for an unknown model."""

    @abc.abstractmethod
    def limits(self, model_id: str) -> Limits:
        """Vocabulary size and context length of an existing model."""

    @abc.abstractmethod
    def source_limits(self, source: SampleSource) -> Limits:
        """Vocabulary size and context length of the weights ``source`` names.

        Raises:
            UserError: The source cannot be read (e.g. not a sampler export).
        """

    @abc.abstractmethod
    def get_info(self, model_id: str) -> dict[str, Any]:
        """Return the ``get_info`` body fields: ``model_data`` (dict), ``is_lora``,
        ``lora_rank``, ``model_name``."""

    # ------------------------------------------------------------------ checked calls

    def create_model(self, model_id: str, spec: ModelSpec) -> None:
        """Create a model under ``model_id``.

        Raises:
            UserError: The spec breaks a rule, or the model already exists.
        """
        rules.check_model_spec(spec)
        if self.model_spec(model_id) is not None:
            raise UserError(f"model_id {model_id!r} already exists")
        self.build_model(model_id, spec)

    def forward(
        self, model_id: str, data: Data, loss_fn: str, loss_fn_config: Config, graph: Graph = None
    ) -> tinker.ForwardBackwardOutput:
        """Compute the loss and per-datum outputs without touching gradients.

        ``graph`` is the uploaded loss a ``custom`` request names, if its session has it.
        """
        self._require_model(model_id)
        limits = self.limits(model_id)
        request = rules.check_loss_request(data, loss_fn, loss_fn_config, limits, graph)
        return self.compute_loss(model_id, request, train=False)

    def forward_backward(
        self, model_id: str, data: Data, loss_fn: str, loss_fn_config: Config, graph: Graph = None
    ) -> tinker.ForwardBackwardOutput:
        """Compute the loss and accumulate its gradient (and the loss-token counts used
        by ``grad_accumulation_normalization``) into the model (``graph`` as `forward`)."""
        self._require_trainable(model_id, "run forward_backward")
        limits = self.limits(model_id)
        request = rules.check_loss_request(data, loss_fn, loss_fn_config, limits, graph)
        return self.compute_loss(model_id, request, train=True)

    def optim_step(
        self,
        model_id: str,
        adam_params: tinker.AdamParams,
        grad_accumulation_normalization: str | None,
    ) -> dict[str, float]:
        """Apply one AdamW step to the accumulated gradient, zero it, and return metrics
        (`optim_metrics`)."""
        self._require_trainable(model_id, "take an optimizer step")
        rules.check_adam_params(adam_params)
        mode = rules.normalization_mode(grad_accumulation_normalization)
        return self.compute_optim_step(model_id, adam_params, mode)

    def save_for_sampler(
        self,
        model_id: str,
        directory: Path,
        checkpoint_type: str,
        previous: Path | None,
    ) -> dict[str, Any]:
        """Export weights for sampling into ``directory``.

        Args:
            model_id: The model.
            directory: Empty target directory, committed by the store afterwards.
            checkpoint_type: One of `checkpoint_types`: ``"base"`` (full weights),
                ``"delta"`` (bitwise XOR against the export in ``previous``) or, where
                the engine has it, ``"merged_base"`` (a LoRA model's adapter merged into
                full weights).
            previous: The previous export of this model, for ``delta``.

        Returns:
            Metadata recorded with the export.
        """
        self._require_model(model_id)
        kind = rules.check_export_kind(checkpoint_type, self.name, self.checkpoint_types)
        if kind == "delta" and previous is None:
            raise UserError("a delta export needs a previous export of this model")
        export = SamplerExport(directory=directory, kind=kind, previous=previous)
        return self.write_sampler_export(model_id, export)

    def sample(self, source: SampleSource, request: SampleRequest) -> tinker.SampleResponse:
        """Generate what an ``asample`` request asks for from ``source``: its
        ``num_samples`` continuations of ``prompt`` and the scores it asks for, checked
        by `rules.check_sampling`. The request's place fields (``model_path``, ...)
        are the caller's to resolve into ``source``; ``target_prompt_logprobs`` is
        answered in the layout it was sent in (dense, or CSR)."""
        picks = (source.export_dir, source.model_id, source.base_model)
        if sum(x is not None for x in picks) != 1:
            raise UserError("sample needs exactly one of export_dir, model_id, base_model")
        if source.model_id is not None:
            self._require_model(source.model_id)
        try:
            prompt = request.prompt.to_ints()
        except ValueError as exc:
            raise UserError("prompt: only encoded_text chunks can be sampled from") from exc
        targets = request.target_prompt_logprobs
        checked = rules.check_sampling(
            prompt,
            request.num_samples,
            request.sampling_params,
            self.source_limits(source),
            prompt_logprobs=request.prompt_logprobs,
            topk_prompt_logprobs=request.topk_prompt_logprobs,
            topk_sample_logprobs=request.topk_sample_logprobs,
            target_prompt_logprobs=None
            if targets is None
            else sample_scores.requested_ids(targets),
            prompt_alt_tokens_k=request.prompt_alt_tokens_k,
        )
        response = self.compute_sample(source, checked)
        if targets is None or response.target_prompt_logprobs is None:
            return response
        layout = sample_scores.in_request_layout(targets, response.target_prompt_logprobs)
        return dataclasses.replace(response, target_prompt_logprobs=layout)

    def _require_model(self, model_id: str) -> ModelSpec:
        spec = self.model_spec(model_id)
        if spec is None:
            raise rules.unknown_model(model_id)
        return spec

    def _require_trainable(self, model_id: str, what: str) -> ModelSpec:
        spec = self._require_model(model_id)
        if spec.base_only:
            raise rules.frozen_model(model_id, what)
        return spec

    @staticmethod
    def loss_output(
        request: LossRequest,
        outputs: list[dict[str, tinker.TensorData]],
        total: float,
        custom_metrics: Sequence[Mapping[str, float]],
    ) -> tinker.ForwardBackwardOutput:
        """What `compute_loss` answers, alike for every engine: each datum's outputs,
        the summed loss and the loss-token count, and a loss graph's own metrics (one
        mapping per datum) reduced by `loss_graphs.reduce_metrics`."""
        metrics = {"loss:sum": total, "loss_tokens:sum": float(request.loss_tokens())}
        if request.graph is not None:
            metrics.update(reduce_metrics(custom_metrics))
        return tinker.ForwardBackwardOutput(
            loss_fn_output_type="TorchLossReturn", loss_fn_outputs=outputs, metrics=metrics
        )

    # ------------------------------------------------------------------ compute hooks

    @abc.abstractmethod
    def build_model(self, model_id: str, spec: ModelSpec) -> None:
        """Create a model from a checked spec (``model_id`` is new)."""

    @abc.abstractmethod
    def compute_loss(
        self, model_id: str, request: LossRequest, *, train: bool
    ) -> tinker.ForwardBackwardOutput:
        """The loss and per-datum ``logprobs`` of a checked request; with ``train``, also
        accumulate its gradient and `LossRequest.loss_tokens` / `LossRequest.sequences`
        into the model's normalization window (all or nothing). A custom loss
        (`LossRequest.graph`) runs through `firetitan.local.loss_interpreter` and adds
        its metrics reduced by `loss_graphs.reduce_metrics`."""

    @abc.abstractmethod
    def compute_optim_step(
        self, model_id: str, adam_params: tinker.AdamParams, normalization: str
    ) -> dict[str, float]:
        """One step with checked parameters; ``normalization`` is a `rules.NORMALIZATIONS`
        mode."""

    @abc.abstractmethod
    def compute_sample(
        self, source: SampleSource, request: SamplingRequest
    ) -> tinker.SampleResponse:
        """Generate from a checked request."""

    # ------------------------------------------------------------------ checkpoints

    @abc.abstractmethod
    def save_state(self, model_id: str, directory: Path) -> None:
        """Write weights, optimizer state, counters and RNG state into ``directory``
        (empty, created by the checkpoint store, committed by it afterwards)."""

    @abc.abstractmethod
    def load_state(self, model_id: str, directory: Path, *, with_optimizer: bool) -> None:
        """Load a `save_state` checkpoint. Without the optimizer, weights are restored
        and the optimizer starts fresh.

        Raises:
            UserError: The checkpoint does not fit this model.
        """

    @abc.abstractmethod
    def write_sampler_export(self, model_id: str, export: SamplerExport) -> dict[str, Any]:
        """Write a checked sampler export (see `save_for_sampler`); return the metadata
        recorded with it."""

    @abc.abstractmethod
    def unload_model(self, model_id: str) -> None:
        """Forget a model and free its memory."""

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing
        """Release engine-wide resources when the trainer stops."""
