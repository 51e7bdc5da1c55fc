"""An engine with no model: right shapes, valid deterministic values, real validation.

It serves protocol tests and benchmarks, where the cost of a model would hide what is
measured. It validates requests as the torch engine does (same rules, same messages that
name the datum and the field), so protocol-level error handling can be tested here.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt
import tinker

from firetitan.local.engine import Engine, ModelSpec, SampleSource, UserError, optim_metrics

__all__ = ["NullEngine"]

DEFAULT_BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
STATE_FILE = "null_state.json"
SAMPLER_FILE = "null_sampler.json"
_FORMAT = "firetitan-null-engine/1"

_RL_LOSSES = frozenset({"importance_sampling", "ppo", "cispo", "dro", "stable_reinforce"})
LOSSES = frozenset({"cross_entropy"}) | _RL_LOSSES
_NORMALIZATIONS = frozenset({"none", "num_loss_tokens", "num_sequences"})

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


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

    def create_model(self, model_id: str, spec: ModelSpec) -> None:
        if not spec.base_model:
            raise UserError("base_model must not be empty")
        if spec.lora_rank < 0:
            raise UserError(f"lora_config.rank must be >= 0, got {spec.lora_rank}")
        if model_id in self._models:
            raise UserError(f"model {model_id!r} already exists")
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

    def forward(
        self,
        model_id: str,
        data: Sequence[tinker.Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None,
    ) -> tinker.ForwardBackwardOutput:
        output, _tokens, _sequences = self._run(model_id, data, loss_fn, loss_fn_config)
        return output

    def forward_backward(
        self,
        model_id: str,
        data: Sequence[tinker.Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, Any] | None,
    ) -> tinker.ForwardBackwardOutput:
        model = self._model(model_id)
        if model.spec.base_only:
            raise UserError(f"model {model_id!r} is a frozen base model; use forward")
        output, tokens, sequences = self._run(model_id, data, loss_fn, loss_fn_config)
        # Only after the whole request validated: a failed request accumulates nothing.
        model.window_tokens += tokens
        model.window_sequences += sequences
        return output

    def optim_step(
        self,
        model_id: str,
        adam_params: tinker.AdamParams,
        grad_accumulation_normalization: str | None,
    ) -> dict[str, float]:
        model = self._model(model_id)
        if model.spec.base_only:
            raise UserError(f"model {model_id!r} is a frozen base model and cannot be trained")
        _check_adam(adam_params)
        norm = grad_accumulation_normalization
        if norm is not None and norm not in _NORMALIZATIONS:
            raise UserError(
                f"grad_accumulation_normalization must be one of {sorted(_NORMALIZATIONS)}, "
                f"got {norm!r}"
            )
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

    def save_for_sampler(
        self,
        model_id: str,
        directory: Path,
        checkpoint_type: str,
        previous: Path | None,
    ) -> dict[str, Any]:
        model = self._model(model_id)
        if checkpoint_type not in ("base", "delta"):
            raise UserError(f"checkpoint_type must be 'base' or 'delta', got {checkpoint_type!r}")
        if checkpoint_type == "delta" and previous is None:
            raise UserError("a delta export needs a previous export of this model")
        marker = {
            "format": _FORMAT,
            "base_model": model.spec.base_model,
            "step": model.step,
            "checkpoint_type": checkpoint_type,
            "previous": None if previous is None else previous.name,
        }
        (directory / SAMPLER_FILE).write_text(json.dumps(marker))
        return {"engine": self.name, "step": model.step}

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        source: SampleSource,
        prompt: Sequence[int],
        num_samples: int,
        params: tinker.SamplingParams,
        *,
        prompt_logprobs: bool = False,
    ) -> tinker.SampleResponse:
        step = self._source_step(source)
        tokens = np.asarray(prompt, dtype=np.int64)
        self._check_tokens(tokens, "prompt")
        if num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {num_samples}")
        max_tokens = 16 if params.max_tokens is None else params.max_tokens
        if max_tokens < 0:
            raise UserError(f"sampling_params.max_tokens must be >= 0, got {max_tokens}")
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
            sequences.append(
                tinker.SampledSequence(
                    stop_reason=reason,
                    sequence_id=f"seq-{self._digest('id', step, tokens.tobytes(), index)[:16]}",
                    tokens_np=out.astype(np.int32),
                    logprobs_np=logprobs,
                )
            )
        prompt_lp: F32 | None = None
        if prompt_logprobs:
            rng = self._rng("prompt", step, tokens.tobytes())
            prompt_lp = _fake_logprobs(rng, tokens.shape)
            if prompt_lp.size:
                prompt_lp[0] = np.nan  # position 0 has no context, as tinker documents
        return tinker.SampleResponse(sequences=sequences, prompt_logprobs_np=prompt_lp)

    # ------------------------------------------------------------------ internals

    def _model(self, model_id: str) -> _Model:
        model = self._models.get(model_id)
        if model is None:
            raise UserError(f"unknown model_id {model_id!r}")
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

    def _check_tokens(self, tokens: I64, field: str) -> None:
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            bad = int(tokens[(tokens < 0) | (tokens >= self.vocab_size)][0])
            raise UserError(
                f"{field}: token id {bad} is outside the vocabulary [0, {self.vocab_size})"
            )

    def _run(
        self,
        model_id: str,
        data: Sequence[tinker.Datum],
        loss_fn: str,
        config: Mapping[str, Any] | None,
    ) -> tuple[tinker.ForwardBackwardOutput, int, int]:
        """Validate a whole request, then compute logprobs, loss and loss-token counts."""
        model = self._model(model_id)
        if loss_fn not in LOSSES:
            raise UserError(f"loss_fn {loss_fn!r} is not supported; use one of {sorted(LOSSES)}")
        config = dict(config or {})
        inputs = [self._datum_inputs(i, d, loss_fn) for i, d in enumerate(data)]
        outputs: list[dict[str, tinker.TensorData]] = []
        total = 0.0
        loss_tokens = 0
        sequences = 0
        for tokens, tensors in inputs:
            targets = tensors["target_tokens"]
            rng = self._rng("lp", model.step, tokens.tobytes(), targets.tobytes())
            lp = _fake_logprobs(rng, targets.shape)
            terms, mask = _loss_terms(loss_fn, lp, tensors, config)
            total += float(terms.sum(dtype=np.float64))
            count = int(np.count_nonzero(mask))
            loss_tokens += count
            sequences += count > 0
            outputs.append({"logprobs": tinker.TensorData.from_numpy(lp)})
        if not math.isfinite(total):
            raise UserError("the loss is not finite for these inputs")
        output = tinker.ForwardBackwardOutput(
            loss_fn_output_type="TorchLossReturn",
            loss_fn_outputs=outputs,
            metrics={"loss:sum": total},
        )
        return output, loss_tokens, sequences

    def _datum_inputs(
        self, index: int, datum: tinker.Datum, loss_fn: str
    ) -> tuple[I64, dict[str, npt.NDArray[Any]]]:
        where = f"data[{index}]"
        try:
            tokens = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
        except ValueError as exc:
            raise UserError(f"{where}.model_input: only encoded_text chunks are supported") from exc
        n = tokens.shape[0]
        if n == 0:
            raise UserError(f"{where}.model_input is empty")
        if n > self.max_context_length:
            raise UserError(
                f"{where}.model_input has {n} tokens; "
                f"the context limit is {self.max_context_length}"
            )
        self._check_tokens(tokens, f"{where}.model_input")
        required = (
            ("target_tokens",)
            if loss_fn == "cross_entropy"
            else (
                "target_tokens",
                "logprobs",
                "advantages",
            )
        )
        tensors: dict[str, npt.NDArray[Any]] = {}
        for name in required:
            if name not in datum.loss_fn_inputs:
                raise UserError(f"{where}.loss_fn_inputs.{name} is required by loss_fn {loss_fn!r}")
        for name, tensor in datum.loss_fn_inputs.items():
            tensors[name] = _dense(tensor)
        targets = tensors["target_tokens"]
        field = f"{where}.loss_fn_inputs.target_tokens"
        if datum.loss_fn_inputs["target_tokens"].dtype != "int64":
            raise UserError(f"{field} must be int64")
        if targets.ndim not in (1, 2) or targets.shape[0] != n:
            raise UserError(
                f"{field} has shape {list(targets.shape)}; it must have leading dimension "
                f"{n} (the model_input length)"
            )
        if targets.ndim == 2 and loss_fn != "cross_entropy":
            raise UserError(f"{field}: 2-D targets are only supported by cross_entropy")
        self._check_tokens(targets, field)
        for name, array in tensors.items():
            if name == "target_tokens":
                continue
            field = f"{where}.loss_fn_inputs.{name}"
            if name in ("weights", "logprobs", "advantages") and array.shape != targets.shape:
                raise UserError(
                    f"{field} has shape {list(array.shape)}; it must match target_tokens "
                    f"{list(targets.shape)}"
                )
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise UserError(f"{field} holds a non-finite value")
        return tokens, tensors


def _dense(tensor: tinker.TensorData) -> npt.NDArray[Any]:
    """A dense numpy view of a TensorData (CSR densified with zeros, without torch)."""
    if tensor.sparse_crow_indices is None:
        return np.asarray(tensor.to_numpy())
    assert tensor.shape is not None and tensor.sparse_col_indices is not None
    values = np.asarray(tensor.to_numpy())
    dense = np.zeros(tensor.shape, dtype=values.dtype)
    crow = np.asarray(tensor.sparse_crow_indices, dtype=np.int64)
    rows = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
    dense[rows, np.asarray(tensor.sparse_col_indices, dtype=np.int64)] = values
    return dense


def _fake_logprobs(rng: np.random.Generator, shape: tuple[int, ...]) -> F32:
    return (-(0.05 + 4.0 * rng.random(shape))).astype(np.float32)


def _loss_terms(
    loss_fn: str, lp: F32, tensors: Mapping[str, npt.NDArray[Any]], config: Mapping[str, Any]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Per-position loss terms (spec/losses.md) and the loss-token mask."""
    logp = lp.astype(np.float64)
    weights = tensors.get("weights")
    w = np.ones_like(logp) if weights is None else weights.astype(np.float64)
    if loss_fn == "cross_entropy":
        return -w * logp, w != 0
    q = tensors["logprobs"].astype(np.float64)
    adv = tensors["advantages"].astype(np.float64)
    ratio = np.exp(logp - q)
    lo = float(config.get("clip_low_threshold", 0.8))
    hi = float(config.get("clip_high_threshold", 1.2))
    if loss_fn == "importance_sampling":
        terms = -ratio * adv
    elif loss_fn == "ppo":
        terms = -np.minimum(ratio * adv, np.clip(ratio, lo, hi) * adv)
    elif loss_fn == "cispo":
        terms = -np.clip(ratio, lo, hi) * logp * adv
    elif loss_fn == "stable_reinforce":
        kl_coeff = float(config.get("kl_coeff", 0.0))
        terms = -(np.minimum(ratio, hi) * logp * adv - 0.5 * kl_coeff * (logp - q) ** 2)
    else:  # dro
        beta = float(config.get("beta", 0.05))
        terms = -(logp * adv - 0.5 * beta * (logp - q) ** 2)
    mask = adv != 0
    if weights is not None:
        mask &= w != 0
    return terms * w, mask


def _check_adam(params: tinker.AdamParams) -> None:
    checks = {
        "learning_rate": params.learning_rate >= 0,
        "beta1": 0 <= params.beta1 < 1,
        "beta2": 0 <= params.beta2 < 1,
        "eps": params.eps > 0,
        "weight_decay": params.weight_decay >= 0,
        "grad_clip_norm": params.grad_clip_norm >= 0,
    }
    for name, ok in checks.items():
        value = getattr(params, name)
        if not (ok and math.isfinite(value)):
            raise UserError(f"adam_params.{name} has an invalid value {value!r}")


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
