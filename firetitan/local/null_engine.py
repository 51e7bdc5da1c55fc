"""An engine with no model: right shapes, valid deterministic values, real validation.

It serves protocol tests and benchmarks, where the cost of a model would hide what is
measured. Requests are checked by the same rules as for the torch engine (``rules.py``,
run by `Engine`), so it refuses exactly what the torch engine refuses, with the same
messages, and protocol-level error handling can be tested here.

Values: a datum's logprobs are a pure function of the engine seed, the model's weight
version (its optimizer step count) and the datum's tokens, drawn from a generator seeded
by a hash of them, always in ``[-4.05, -0.05]``. Losses apply the formulas of
``spec/losses.md`` to those logprobs, so ``loss:sum`` is exactly what the real formula
gives for the reported ``logprobs``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt
import tinker

from firetitan.local import rules, sample_scores
from firetitan.local.engine import (
    Engine,
    ModelSpec,
    SamplerExport,
    SampleSource,
    UserError,
    optim_metrics,
)
from firetitan.local.loss_graphs import LossGraph, no_gradient

__all__ = ["NullEngine"]

DEFAULT_BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
STATE_FILE = "null_state.json"
SAMPLER_FILE = "null_sampler.json"
_FORMAT = "firetitan-null-engine/1"

F32 = npt.NDArray[np.float32]


@attrs.define(eq=False)
class _Model:
    spec: ModelSpec
    step: int = 0  # weight version: optimizer steps applied to the weights
    adam_step: int = 0  # optimizer state: steps recorded in the (pretend) Adam moments
    window_tokens: int = 0  # loss tokens accumulated since the last optim_step
    window_sequences: int = 0


class NullEngine(Engine):
    """No compute; see the module docstring.

    Args:
        base_model: The model name reported by ``get_server_capabilities``; any name is
            accepted by ``create_model``.
        seed: Seeds every generated value.
        vocab_size: Token ids must be below this.
        max_context_length: Longest accepted ``model_input``.
    """

    name = "null"

    def __init__(
        self,
        base_model: str = DEFAULT_BASE_MODEL,
        *,
        seed: int = 0,
        vocab_size: int = 512,
        max_context_length: int = 4096,
    ) -> None:
        self.base_model = base_model
        self.seed = seed
        self.vocab_size = vocab_size
        self.max_context_length = max_context_length
        self._models: dict[str, _Model] = {}

    # ------------------------------------------------------------------ models

    def model_ids(self) -> list[str]:
        """Ids of the models currently loaded (for tests)."""
        return sorted(self._models)

    def supported_models(self) -> list[dict[str, Any]]:
        return [{"model_name": self.base_model, "max_context_length": self.max_context_length}]

    def model_spec(self, model_id: str) -> ModelSpec | None:
        model = self._models.get(model_id)
        return None if model is None else model.spec

    def limits(self, model_id: str) -> rules.Limits:
        return rules.Limits(vocab_size=self.vocab_size, context_length=self.max_context_length)

    def source_limits(self, source: SampleSource) -> rules.Limits:
        self._source_step(source)  # an unreadable export is refused here
        return rules.Limits(vocab_size=self.vocab_size, context_length=self.max_context_length)

    def build_model(self, model_id: str, spec: ModelSpec) -> None:
        self._models[model_id] = _Model(spec)

    def get_info(self, model_id: str) -> dict[str, Any]:
        spec = self._model(model_id).spec
        return {
            "model_data": {"arch": "NullEngine", "model_name": spec.base_model},
            "is_lora": spec.lora_rank > 0,
            "lora_rank": spec.lora_rank,
            "model_name": spec.base_model,
        }

    def unload_model(self, model_id: str) -> None:
        self._models.pop(model_id, None)

    # ------------------------------------------------------------------ compute

    def compute_loss(
        self, model_id: str, request: rules.LossRequest, *, train: bool
    ) -> tinker.ForwardBackwardOutput:
        model = self._model(model_id)
        outputs: list[dict[str, tinker.TensorData]] = []
        custom_metrics: list[dict[str, float]] = []
        total = 0.0
        for index, datum in enumerate(request.datums):
            rng = self._rng("lp", model.step, datum.tokens.tobytes(), datum.targets.tobytes())
            lp = _fake_logprobs(rng, datum.targets.shape)
            if request.graph is not None:
                loss, metrics = _graph_loss(request.graph, lp, datum, index, train=train)
                custom_metrics.append(metrics)
            else:
                with np.errstate(over="ignore", invalid="ignore"):  # reported just below
                    loss = float(_loss_terms(request.loss_fn, lp, datum, request.config).sum())
            if not math.isfinite(loss):
                raise rules.non_finite_loss(index)
            total += loss
            outputs.append({"logprobs": tinker.TensorData.from_numpy(lp)})
        if train:  # only now that the whole request computed: all or nothing
            model.window_tokens += request.loss_tokens()
            model.window_sequences += request.sequences()
        return self.loss_output(request, outputs, total, custom_metrics)

    def compute_optim_step(
        self, model_id: str, adam_params: tinker.AdamParams, normalization: str
    ) -> dict[str, float]:
        model = self._model(model_id)
        metrics = optim_metrics(
            step=model.step + 1,
            learning_rate=adam_params.learning_rate,
            loss_tokens=model.window_tokens,
            sequences=model.window_sequences,
        )
        model.step += 1
        model.adam_step += 1
        model.window_tokens = model.window_sequences = 0
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, model_id: str, directory: Path) -> None:
        model = self._model(model_id)
        state = {
            "format": _FORMAT,
            "base_model": model.spec.base_model,
            "lora_rank": model.spec.lora_rank,
            "step": model.step,
            "adam_step": model.adam_step,
        }
        (directory / STATE_FILE).write_text(json.dumps(state))

    def load_state(self, model_id: str, directory: Path, *, with_optimizer: bool) -> None:
        model = self._model(model_id)
        state = _read_json(directory / STATE_FILE, "state checkpoint")
        if state.get("base_model") != model.spec.base_model:
            raise UserError(
                f"checkpoint is of base model {state.get('base_model')!r}, "
                f"model {model_id!r} is {model.spec.base_model!r}"
            )
        if state.get("lora_rank") != model.spec.lora_rank:
            raise UserError(
                f"checkpoint has lora_rank {state.get('lora_rank')!r}, "
                f"model {model_id!r} has {model.spec.lora_rank}"
            )
        model.step = int(state["step"])
        model.adam_step = int(state["adam_step"]) if with_optimizer else 0
        model.window_tokens = model.window_sequences = 0

    def write_sampler_export(self, model_id: str, export: SamplerExport) -> dict[str, Any]:
        model = self._model(model_id)
        marker = {
            "format": _FORMAT,
            "base_model": model.spec.base_model,
            "step": model.step,
            "checkpoint_type": export.kind,
            "previous": None if export.previous is None else export.previous.name,
        }
        (export.directory / SAMPLER_FILE).write_text(json.dumps(marker))
        return {"engine": self.name, "step": model.step}

    # ------------------------------------------------------------------ sampling

    def compute_sample(
        self, source: SampleSource, request: rules.SamplingRequest
    ) -> tinker.SampleResponse:
        step = self._source_step(source)
        params, num_samples = request.params, request.num_samples
        tokens = np.asarray(request.prompt, dtype=np.int64)
        max_tokens = 16 if params.max_tokens is None else params.max_tokens
        stops = _stop_tokens(params.stop)
        sequences = []
        for index in range(num_samples):
            rng = self._rng("sample", step, tokens.tobytes(), params.seed, index)
            out = rng.integers(0, self.vocab_size, size=max_tokens, dtype=np.int64)
            reason: Literal["length", "stop"] = "length"
            if stops:
                hits = np.flatnonzero(np.isin(out, list(stops)))
                if hits.size:
                    out = out[: hits[0] + 1]
                    reason = "stop"
            logprobs = _fake_logprobs(rng, out.shape)
            top = None
            if request.topk_sample_logprobs:
                k = request.topk_sample_logprobs
                top = sample_scores.topk(*self._fake_topk(rng, out.size, k))
            sequences.append(
                tinker.SampledSequence(
                    stop_reason=reason,
                    sequence_id=f"seq-{self._digest('id', step, tokens.tobytes(), index)[:16]}",
                    tokens_np=out.astype(np.int32),
                    logprobs_np=logprobs,
                    topk_logprobs_np=top,
                )
            )
        return tinker.SampleResponse(
            sequences=sequences, **self._prompt_scores(request, step, tokens)
        )

    def _prompt_scores(
        self, request: rules.SamplingRequest, step: int, tokens: npt.NDArray[np.int64]
    ) -> dict[str, Any]:
        """The prompt's result fields the request asks for, with deterministic values."""
        fields: dict[str, Any] = {}
        following = tokens.size - 1
        if request.prompt_logprobs:
            prompt_lp = _fake_logprobs(self._rng("prompt", step, tokens.tobytes()), tokens.shape)
            if prompt_lp.size:
                prompt_lp[0] = np.nan  # position 0 has no context, as tinker documents
            fields["prompt_logprobs_np"] = prompt_lp
        if request.topk_prompt_logprobs:
            rng = self._rng("prompt-topk", step, tokens.tobytes())
            ids, lps = self._fake_topk(rng, following, request.topk_prompt_logprobs)
            fields["topk_prompt_logprobs_np"] = sample_scores.prompt_topk(ids, lps)
        targets = request.target_prompt_logprobs
        if targets is not None:
            rng = self._rng("prompt-targets", step, tokens.tobytes())
            scored = _fake_logprobs(rng, targets.shape)
            fields["target_prompt_logprobs"] = sample_scores.target_logprobs(targets, scored)
        k = request.prompt_alt_tokens_k
        if k:
            rng = self._rng("prompt-alt", step, tokens.tobytes(), request.params.seed)
            draws = rng.integers(0, self.vocab_size, size=(following, k), dtype=np.int64)
            fields["prompt_alt_tokens"] = sample_scores.alt_tokens(
                draws, _fake_logprobs(rng, draws.shape)
            )
        return fields

    def _fake_topk(self, rng: np.random.Generator, rows: int, k: int) -> tuple[Any, F32]:
        """(rows, k) distinct ids per row and logprobs falling along each row."""
        ids = [rng.choice(self.vocab_size, size=k, replace=False) for _ in range(rows)]
        return np.reshape(ids, (rows, k)), -np.sort(-_fake_logprobs(rng, (rows, k)), axis=1)

    # ------------------------------------------------------------------ internals

    def _model(self, model_id: str) -> _Model:
        model = self._models.get(model_id)
        if model is None:
            raise rules.unknown_model(model_id)
        return model

    def _source_step(self, source: SampleSource) -> int:
        if source.export_dir is not None:
            marker = _read_json(source.export_dir / SAMPLER_FILE, "sampler export")
            return int(marker["step"])
        if source.model_id is not None:
            return self._model(source.model_id).step
        return 0

    def _digest(self, *parts: object) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(str(self.seed).encode())
        for part in parts:
            h.update(b"\x00")
            h.update(part if isinstance(part, bytes) else repr(part).encode())
        return h.hexdigest()

    def _rng(self, *parts: object) -> np.random.Generator:
        return np.random.default_rng(int(self._digest(*parts), 16))


def _fake_logprobs(rng: np.random.Generator, shape: tuple[int, ...]) -> F32:
    return (-(0.05 + 4.0 * rng.random(shape))).astype(np.float32)


def _loss_terms(
    loss_fn: str, lp: F32, datum: rules.DatumArrays, config: rules.LossConfig
) -> npt.NDArray[np.float64]:
    """Per-position loss terms (the formulas of `rules.LOSSES`), zero where an RL loss
    has no loss token."""
    logp = lp.astype(np.float64)
    w = np.ones_like(logp) if datum.weights is None else datum.weights.astype(np.float64)
    if loss_fn == "cross_entropy":
        return -w * logp
    assert datum.sampler_logprobs is not None and datum.advantages is not None
    q = datum.sampler_logprobs.astype(np.float64)
    adv = datum.advantages.astype(np.float64)
    ratio = np.exp(logp - q)
    lo, hi = config.clip_low, config.clip_high
    if loss_fn == "importance_sampling":
        terms = -ratio * adv
    elif loss_fn == "ppo":
        terms = -np.minimum(ratio * adv, np.clip(ratio, lo, hi) * adv)
    elif loss_fn == "gspo":
        marked = datum.ratio_positions
        assert marked is not None
        # The value of the sequence ratio at every position (gspo's s_t; no gradients
        # here). Nothing is marked only when no position carries the loss: any value does.
        seq_ratio = np.exp(np.mean((logp - q)[marked])) if marked.any() else 1.0
        terms = -np.minimum(seq_ratio * adv, np.clip(seq_ratio, lo, hi) * adv)
    elif loss_fn == "cispo":
        terms = -np.clip(ratio, lo, hi) * logp * adv
    elif loss_fn == "dro":
        terms = -(logp * adv - 0.5 * config.beta * (logp - q) ** 2)
    elif loss_fn == "stable_reinforce":
        weight = np.minimum(ratio, config.clip_high)
        terms = -(weight * logp * adv - 0.5 * config.kl_coeff * (logp - q) ** 2)
    else:  # the rules refuse unknown losses before an engine computes
        raise AssertionError(loss_fn)
    return np.where(datum.loss_positions, terms * w, 0.0)


def _graph_loss(
    graph: LossGraph, lp: F32, datum: rules.DatumArrays, index: int, *, train: bool
) -> tuple[float, dict[str, float]]:
    """An uploaded loss on the fake logprobs, through the torch engine's interpreter
    (torch is imported only here: the null engine runs without it otherwise). Training
    on it needs a loss that depends on the logprobs, as on the torch engine."""
    try:
        import torch

        from firetitan.local import loss_interpreter
    except ImportError as exc:
        raise UserError(
            "custom losses need torch on the trainer (pip install 'firetitan[local]')"
        ) from exc
    logprobs = torch.from_numpy(lp).requires_grad_(train)
    values = [logprobs, *(torch.from_numpy(a) for a in datum.custom_inputs)]
    loss, metrics = loss_interpreter.run(graph, values, index)
    if train and not loss.requires_grad:
        raise no_gradient(graph)
    return float(loss.detach()), metrics


def _stop_tokens(stop: object) -> set[int]:
    """Token-id stop conditions; string stops need a tokenizer and are ignored here."""
    if isinstance(stop, Sequence) and not isinstance(stop, str):
        return {s for s in stop if isinstance(s, int)}
    return set()


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"not a {what} of the null engine (no readable {path.name})") from exc
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise UserError(f"not a {what} of the null engine")
    return raw
