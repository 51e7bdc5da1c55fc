"""The trainer's engine-independent rules: the loss catalogue and every request check.

What a request may ask for does not depend on how an engine computes it, so it is
decided here, once, with one wording for every message: `Engine` (``engine.py``) runs
these checks before it calls an engine's compute hooks, and the null and the torch
engine therefore refuse exactly the same requests with exactly the same errors.
Engines only compute, on inputs that passed.

The loss catalogue (`LOSSES`) is also the source of the losses reference
(``docs/losses.md``, written by ``scripts/gen_losses_doc.py``): add a built-in loss
here, with its inputs and config keys, and its compute in each engine.

Wording: a field that is out of range reads ``<field> must be a finite number <range>,
got <value>``; a datum's problem starts with ``datum <index>:`` and names the
``loss_fn_inputs`` key. Only the engine's facts (vocabulary size, context length) enter
the messages, through `Limits`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import numpy as np
import numpy.typing as npt
import tinker

from firetitan.local.user_error import UserError

if TYPE_CHECKING:
    from firetitan.local.loss_graphs import LossGraph

__all__ = [
    "ADAM_RANGES",
    "CUSTOM_LOSS",
    "LOSSES",
    "MAX_LOGPROB_CELLS",
    "MAX_LOGPROB_WIDTH",
    "NORMALIZATIONS",
    "RATIO_MASK",
    "ConfigKey",
    "DatumArrays",
    "Interval",
    "Limits",
    "LossConfig",
    "LossRequest",
    "LossSpec",
    "SamplingRequest",
    "UserError",
    "check_adam_params",
    "check_loss_request",
    "check_model_spec",
    "check_sampling",
    "frozen_model",
    "non_finite_loss",
    "normalization_mode",
    "unknown_model",
]


IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@attrs.frozen
class Interval:
    """A range of allowed numbers, and how messages and the reference spell it."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo == -math.inf:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{_num(self.lo)}, {_num(self.hi)}{right}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


NON_NEGATIVE: Final = Interval(0.0)
POSITIVE: Final = Interval(0.0, lo_open=True)
UNIT_OPEN_ABOVE: Final = Interval(0.0, 1.0, hi_open=True)


def _check_number(field: str, value: object, allowed: Interval) -> float:
    """``value`` as a float, or a `UserError` in the one wording."""
    if isinstance(value, bool) or not isinstance(value, int | float) or float(value) not in allowed:
        raise UserError(f"{field} must be a finite number {allowed}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- loss catalogue


@attrs.frozen(kw_only=True)
class ConfigKey:
    """One ``loss_fn_config`` key a loss reads.

    Attributes:
        name: The key.
        default: Its value when absent.
        allowed: The accepted values (for numbers), or None with ``choices``.
        choices: The accepted strings, for string keys.
        doc: What it does.
    """

    name: str
    default: float | str
    doc: str
    allowed: Interval | None = None
    choices: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class LossSpec:
    """A built-in loss, as the losses reference documents it.

    Attributes:
        name: The ``loss_fn`` string.
        formula: The loss, in the notation of the reference.
        required: ``loss_fn_inputs`` keys every datum must carry.
        optional: Keys it reads when present.
        weights: What ``weights`` does for this loss.
        loss_tokens: Which positions count as loss tokens for normalization.
        config: The ``loss_fn_config`` keys it reads (besides `COMMON_CONFIG`).
        top_k_targets: Whether ``target_tokens`` may have shape (N, K).
    """

    name: str
    formula: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    weights: str
    loss_tokens: str
    config: tuple[ConfigKey, ...] = ()
    top_k_targets: bool = False

    @property
    def rl(self) -> bool:
        """An RL loss: it reads the sampler's ``logprobs`` and the ``advantages``."""
        return "advantages" in self.required

    def config_keys(self) -> dict[str, ConfigKey]:
        """Every key this loss accepts in ``loss_fn_config``, by name."""
        return {key.name: key for key in (*COMMON_CONFIG, *self.config)}


#: Keys every loss accepts.
COMMON_CONFIG: Final = (
    ConfigKey(
        name="target_logprob_support",
        default="full_vocabulary",
        choices=("full_vocabulary",),
        doc="The support of the learner's log-probabilities; this trainer computes them "
        "over the full vocabulary only.",
    ),
)

# Defaults of the config keys below, shared with `LossConfig` (losses.md).
CLIP_LOW_DEFAULT: Final = 0.8
CLIP_HIGH_DEFAULT: Final = 1.2
BETA_DEFAULT: Final = 0.05

#: The ``gspo`` input marking the positions its sequence ratio averages over.
RATIO_MASK: Final = "sequence_ratio_mask"

_CLIP = (
    ConfigKey(
        name="clip_low_threshold",
        default=CLIP_LOW_DEFAULT,
        allowed=NON_NEGATIVE,
        doc="Lower bound `lo` of the ratio itself (not ε); at most `clip_high_threshold`.",
    ),
    ConfigKey(
        name="clip_high_threshold",
        default=CLIP_HIGH_DEFAULT,
        allowed=NON_NEGATIVE,
        doc="Upper bound `hi` of the ratio itself (not ε); at least `clip_low_threshold`.",
    ),
)


def _rl_loss(
    name: str,
    formula: str,
    config: tuple[ConfigKey, ...] = (),
    extra_optional: tuple[str, ...] = (),
) -> LossSpec:
    """An RL loss: sampler logprobs and advantages in, ``weights`` a mask (and the
    ``extra_optional`` inputs it reads when present)."""
    return LossSpec(
        name=name,
        formula=formula,
        required=("target_tokens", "logprobs", "advantages"),
        optional=("weights", *extra_optional),
        weights="Optional mask: multiplies each position's term (1 when absent). "
        "Positions with `A_t = 0` carry no gradient whatever their weight.",
        loss_tokens="Positions with `A_t ≠ 0` (and `w_t ≠ 0` when `weights` is given).",
        config=config,
    )


#: The built-in losses, by ``loss_fn`` name.
LOSSES: Final[dict[str, LossSpec]] = {
    spec.name: spec
    for spec in (
        LossSpec(
            name="cross_entropy",
            formula="L = −Σ_t w_t · lp_t",
            required=("target_tokens",),
            optional=("weights",),
            weights="Any real number, negative included, never renormalized (all ones when "
            "absent). With (N, K) targets and weights: `L = −Σ_t Σ_k w_tk · lp_tk`.",
            loss_tokens="Positions with `w_t ≠ 0` (any of the K weights for (N, K) targets); "
            "every position when `weights` is absent.",
            top_k_targets=True,
        ),
        _rl_loss("importance_sampling", "L = −Σ_t exp(lp_t − q_t) · A_t"),
        _rl_loss(
            "ppo",
            "r_t = exp(lp_t − q_t); L = −Σ_t min(r_t · A_t, clip(r_t, lo, hi) · A_t)",
            _CLIP,
        ),
        _rl_loss("cispo", "L = −Σ_t sg(clip(r_t, lo, hi)) · lp_t · A_t (sg: stop-gradient)", _CLIP),
        _rl_loss(
            "dro",
            "L = −Σ_t [lp_t · A_t − ½ · β · (lp_t − q_t)²]",
            (
                ConfigKey(
                    name="beta",
                    default=BETA_DEFAULT,
                    allowed=NON_NEGATIVE,
                    doc="Weight β of the quadratic penalty on `lp_t − q_t`.",
                ),
            ),
        ),
        _rl_loss(
            "gspo",
            "s = exp(mean over M of (lp_t − q_t)), M = {t : m_t ≠ 0} with m = "
            "sequence_ratio_mask (when given it must mark a position; when absent M is the "
            "datum's loss tokens); s_t = sg(s) · exp(lp_t − sg(lp_t)), the value of s with "
            "the gradient of lp_t (GSPO-token); L = −Σ_t min(s_t · A_t, clip(s_t, lo, hi) · A_t)",
            _CLIP,
            extra_optional=(RATIO_MASK,),
        ),
        _rl_loss(
            "stable_reinforce",
            "r_t = exp(lp_t − q_t); L = −Σ_t [sg(min(r_t, hi)) · lp_t · A_t − ½ · κ · "
            "(lp_t − q_t)²], with q_t the sampler's logprobs as the trainer recorded them "
            "(`record_stability_info`), never the client's copy; every datum carries "
            "provenance spans naming its sampled sequences, and A_t = 0 on prompt tokens",
            (
                ConfigKey(
                    name="clip_high_threshold",
                    default=CLIP_HIGH_DEFAULT,
                    allowed=NON_NEGATIVE,
                    doc="Upper bound `hi` of the importance weight (truncated, never raised).",
                ),
                ConfigKey(
                    name="kl_coeff",
                    default=0.0,
                    allowed=NON_NEGATIVE,
                    doc="Weight κ of the quadratic pull of `lp_t` towards the sampler's `q_t`.",
                ),
            ),
        ),
    )
}


#: An uploaded loss (`firetitan.local.loss_graphs`): ``loss_fn="custom"`` with
#: ``loss_fn_config={"loss_id": ...}``. Not in `LOSSES`: its inputs are the graph's.
CUSTOM_LOSS: Final = LossSpec(
    name="custom",
    formula="L = Σ_datums loss(lp, *inputs), the graph uploaded with create_custom_loss",
    required=("target_tokens",),
    optional=(),
    weights="Read only if the graph takes it as an input.",
    loss_tokens="Every position.",
)


@attrs.frozen(kw_only=True)
class LossConfig:
    """A checked ``loss_fn_config``: the keys each loss reads, defaults filled in."""

    clip_low: float = CLIP_LOW_DEFAULT
    clip_high: float = CLIP_HIGH_DEFAULT
    beta: float = BETA_DEFAULT
    kl_coeff: float = 0.0


def _loss_spec(loss_fn: str) -> LossSpec:
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise UserError(
            f"unknown loss_fn {loss_fn!r}; built-in losses: {sorted(LOSSES)}, or 'custom' "
            "for a loss uploaded with create_custom_loss"
        )
    return spec


def check_loss_config(spec: LossSpec, config: Mapping[str, Any] | None) -> LossConfig:
    """Check ``loss_fn_config`` against the keys ``spec`` reads.

    Raises:
        UserError: An unknown key (the message lists the valid ones), a value of the
            wrong type or out of range, or clip bounds out of order.
    """
    cfg = dict(config or {})
    keys = spec.config_keys()
    unknown = sorted(k for k in cfg if k not in keys)
    if unknown:
        raise UserError(
            f"loss_fn_config has unknown key(s) {unknown} for loss_fn {spec.name!r}; "
            f"valid keys: {sorted(keys)}"
        )
    values: dict[str, float] = {}
    for key in keys.values():
        value = cfg.get(key.name, key.default)
        field = f"loss_fn_config[{key.name!r}]"
        if key.choices:
            if value not in key.choices:
                raise UserError(f"{field} must be one of {list(key.choices)}, got {value!r}")
        else:
            assert key.allowed is not None
            values[key.name] = _check_number(field, value, key.allowed)
    defaults = LossConfig()
    lo = values.get("clip_low_threshold", defaults.clip_low)
    hi = values.get("clip_high_threshold", defaults.clip_high)
    if "clip_low_threshold" in keys and lo > hi:
        raise UserError(
            f"loss_fn_config['clip_low_threshold'] must be <= "
            f"loss_fn_config['clip_high_threshold'], got {lo} and {hi}"
        )
    return LossConfig(
        clip_low=lo,
        clip_high=hi,
        beta=values.get("beta", defaults.beta),
        kl_coeff=values.get("kl_coeff", defaults.kl_coeff),
    )


# --------------------------------------------------------------------------- datums


@attrs.frozen(kw_only=True)
class Limits:
    """The engine's facts a request is checked against.

    Attributes:
        vocab_size: Token ids must be below it.
        context_length: The longest sequence the model takes.
    """

    vocab_size: int
    context_length: int


@attrs.frozen(eq=False)
class DatumArrays:
    """One checked datum.

    Attributes:
        tokens: ``model_input`` token ids, shape (N,).
        targets: ``target_tokens``, shape (N,) or (N, K) for the top-K form.
        weights: ``weights`` (same shape as ``targets``), or None when absent.
        sampler_logprobs: ``logprobs`` (N,) for RL losses, else None.
        advantages: ``advantages`` (N,) for RL losses, else None.
        loss_positions: (N,) bool: the loss tokens (`LossSpec.loss_tokens`).
        ratio_positions: (N,) bool: for the losses that read ``sequence_ratio_mask``, the
            positions it marks (the loss tokens when it is absent), else None.
        custom_inputs: For a custom loss, the ``loss_fn_inputs`` its graph reads, in
            `LossGraph.input_keys` order (float32 or int64, as sent).
    """

    tokens: IntArray
    targets: IntArray
    weights: FloatArray | None
    sampler_logprobs: FloatArray | None
    advantages: FloatArray | None
    loss_positions: npt.NDArray[np.bool_]
    ratio_positions: npt.NDArray[np.bool_] | None = None
    custom_inputs: tuple[npt.NDArray[Any], ...] = ()

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def width(self) -> int:
        """K for top-K targets, 1 for plain (N,) targets."""
        return int(self.targets.shape[1]) if self.targets.ndim == 2 else 1


@attrs.frozen(eq=False)
class LossRequest:
    """A checked ``forward`` / ``forward_backward`` request, what engines compute on.

    Attributes:
        loss: The loss.
        config: Its checked config.
        datums: The checked datums, in order.
        graph: The uploaded loss, for `CUSTOM_LOSS`.
    """

    loss: LossSpec
    config: LossConfig
    datums: list[DatumArrays]
    graph: LossGraph | None = None

    @property
    def loss_fn(self) -> str:
        return self.loss.name

    def loss_tokens(self) -> int:
        """Loss tokens of the request (what ``num_loss_tokens`` divides by)."""
        return sum(int(d.loss_positions.sum()) for d in self.datums)

    def sequences(self) -> int:
        """Datums with at least one loss token (what ``num_sequences`` divides by)."""
        return sum(1 for d in self.datums if d.loss_positions.any())


def check_loss_request(
    data: Sequence[tinker.Datum],
    loss_fn: str,
    config: Mapping[str, Any] | None,
    limits: Limits,
    graph: LossGraph | None = None,
) -> LossRequest:
    """Check a whole ``forward`` / ``forward_backward`` request before any compute.

    ``graph`` is the uploaded loss a ``custom`` request names (resolved by the caller,
    which knows the sessions), None if the request names none this session owns.

    Raises:
        UserError: An unknown loss or config key, a bad config value, or a datum with
            missing inputs (all of them named), a wrong shape or dtype, an unsupported
            chunk, a token id outside the vocabulary, a sequence longer than the
            context, or a non-finite value. Datum messages name the index and the field.
    """
    if loss_fn == CUSTOM_LOSS.name:
        return _check_custom_request(data, config, limits, graph)
    spec = _loss_spec(loss_fn)
    checked = check_loss_config(spec, config)
    if not data:
        raise UserError("data is empty; send at least one datum")
    datums = [_check_datum(i, datum, spec, limits) for i, datum in enumerate(data)]
    return LossRequest(loss=spec, config=checked, datums=datums)


def check_custom_config(config: Mapping[str, Any] | None) -> str:
    """The ``loss_id`` of a ``custom`` request's ``loss_fn_config``.

    Raises:
        UserError: The config is not exactly ``{"loss_id": <string>}``.
    """
    cfg = dict(config or {})
    loss_id = cfg.get("loss_id")
    if set(cfg) != {"loss_id"} or not isinstance(loss_id, str):
        raise UserError(
            "loss_fn 'custom' takes loss_fn_config={'loss_id': <the id create_custom_loss "
            f"answered>}} and nothing else, got keys {sorted(cfg)}"
        )
    return loss_id


def _check_custom_request(
    data: Sequence[tinker.Datum],
    config: Mapping[str, Any] | None,
    limits: Limits,
    graph: LossGraph | None,
) -> LossRequest:
    loss_id = check_custom_config(config)
    if graph is None or graph.loss_id != loss_id:
        raise UserError(
            f"loss_fn_config['loss_id']: {loss_id!r} names no custom loss of this model's "
            "session; create it with create_custom_loss in the same session"
        )
    if not data:
        raise UserError("data is empty; send at least one datum")
    return LossRequest(
        loss=CUSTOM_LOSS,
        config=LossConfig(),
        datums=[_check_custom_datum(i, datum, graph, limits) for i, datum in enumerate(data)],
        graph=graph,
    )


def _check_custom_datum(
    index: int, datum: tinker.Datum, graph: LossGraph, limits: Limits
) -> DatumArrays:
    """A custom loss's datum: its targets give ``logprobs`` the declared rank, and each
    input the graph reads is present with its declared rank (`LossGraph.inputs`)."""
    where = f"datum {index}"
    tokens = _tokens(where, datum.model_input, limits)
    n = tokens.shape[0]
    inputs: Mapping[str, Any] = datum.loss_fn_inputs
    missing = [key for key in ("target_tokens", *graph.input_keys) if key not in inputs]
    if missing:
        raise UserError(
            f"{where}: loss_fn_inputs is missing {', '.join(map(repr, missing))}, required by "
            f"custom loss {graph.name!r} (it needs target_tokens, {', '.join(graph.input_keys)})"
        )
    targets = _array(where, "target_tokens", inputs["target_tokens"], integer=True)
    rank = graph.inputs[0].rank
    if targets.ndim != rank or targets.shape[0] != n or (rank == 2 and targets.shape[1] == 0):
        raise UserError(
            f"{where}: loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; "
            f"custom loss {graph.name!r} takes logprobs of rank {rank}, so it must be "
            f"{f'[{n}]' if rank == 1 else f'[{n}, K]'}"
        )
    _check_ids(where, "loss_fn_inputs['target_tokens']", targets, limits.vocab_size)
    arrays: list[npt.NDArray[Any]] = []
    for item in graph.inputs[1:]:
        arr = _array(where, item.name, inputs[item.name], integer=False)
        if arr.ndim != item.rank:
            raise UserError(
                f"{where}: loss_fn_inputs[{item.name!r}] has rank {arr.ndim}; custom loss "
                f"{graph.name!r} declared it with rank {item.rank}"
            )
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
            if not np.isfinite(arr).all():
                pos = np.argwhere(~np.isfinite(arr))[0].tolist()
                raise UserError(
                    f"{where}: loss_fn_inputs[{item.name!r}] holds a non-finite value at "
                    f"index {pos}"
                )
        else:
            arr = arr.astype(np.int64)
        arrays.append(arr)
    return DatumArrays(
        tokens=tokens,
        targets=targets.astype(np.int64, copy=False),
        weights=None,
        sampler_logprobs=None,
        advantages=None,
        loss_positions=np.ones(n, dtype=np.bool_),
        custom_inputs=tuple(arrays),
    )


def _check_datum(index: int, datum: tinker.Datum, spec: LossSpec, limits: Limits) -> DatumArrays:
    where = f"datum {index}"
    tokens = _tokens(where, datum.model_input, limits)
    n = tokens.shape[0]
    inputs: Mapping[str, Any] = datum.loss_fn_inputs
    missing = [key for key in spec.required if key not in inputs]
    if missing:
        raise UserError(
            f"{where}: loss_fn_inputs is missing {', '.join(map(repr, missing))}, "
            f"required by {spec.name} (it needs {', '.join(spec.required)})"
        )

    targets = _array(where, "target_tokens", inputs["target_tokens"], integer=True)
    if not spec.top_k_targets and targets.ndim != 1:
        raise UserError(
            f"{where}: loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; "
            f"{spec.name} takes one target per position, shape [{n}]"
        )
    if (
        targets.ndim not in (1, 2)
        or targets.shape[0] != n
        or (targets.ndim == 2 and targets.shape[1] == 0)
    ):
        raise UserError(
            f"{where}: loss_fn_inputs['target_tokens'] has shape {list(targets.shape)}; "
            f"expected [{n}] or [{n}, K] (model_input length {n})"
        )
    _check_ids(where, "loss_fn_inputs['target_tokens']", targets, limits.vocab_size)
    target_ints = targets.astype(np.int64, copy=False)

    weights = None
    if "weights" in inputs:
        weights = _float(where, "weights", inputs["weights"], list(targets.shape))
    sampler_logprobs = advantages = None
    if spec.rl:
        sampler_logprobs = _float(where, "logprobs", inputs["logprobs"], [n])
        advantages = _float(where, "advantages", inputs["advantages"], [n])

    # Loss tokens (LossSpec.loss_tokens): w != 0 for cross_entropy (any of the K
    # entries for the top-K form); A != 0, and w != 0 when weights are given, for RL.
    if advantages is not None:
        positions = advantages != 0
        if weights is not None:
            positions &= weights != 0
    elif weights is None:
        positions = np.ones(n, dtype=np.bool_)
    else:
        nonzero = weights != 0
        positions = nonzero if nonzero.ndim == 1 else nonzero.any(axis=1)

    ratio_positions = None
    if RATIO_MASK in spec.optional:
        # tinker's cookbook RL loop sends the mask, its rl.train does not: without one the
        # ratio averages over the positions that carry the loss.
        ratio_positions = positions
        if RATIO_MASK in inputs:
            ratio_positions = _float(where, RATIO_MASK, inputs[RATIO_MASK], [n]) != 0
            if not ratio_positions.any():
                raise UserError(
                    f"{where}: loss_fn_inputs[{RATIO_MASK!r}] marks no position; {spec.name} "
                    "averages its sequence ratio over the marked (non-zero) positions"
                )
    return DatumArrays(
        tokens=tokens,
        targets=target_ints,
        weights=weights,
        sampler_logprobs=sampler_logprobs,
        advantages=advantages,
        loss_positions=positions,
        ratio_positions=ratio_positions,
    )


def _tokens(where: str, model_input: tinker.ModelInput, limits: Limits) -> IntArray:
    parts: list[IntArray] = []
    for j, chunk in enumerate(model_input.chunks):
        if not isinstance(chunk, tinker.EncodedTextChunk):
            kind = getattr(chunk, "type", type(chunk).__name__)
            raise UserError(
                f"{where}: model_input chunk {j} is of type {kind!r}; this trainer "
                "accepts encoded_text chunks only"
            )
        try:
            parts.append(np.asarray(chunk.tokens, dtype=np.int64).reshape(-1))
        except (OverflowError, ValueError, TypeError) as exc:
            raise UserError(f"{where}: model_input chunk {j} holds a non-integer token id") from exc
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if tokens.shape[0] == 0:
        raise UserError(f"{where}: model_input is empty")
    if tokens.shape[0] > limits.context_length:
        raise UserError(
            f"{where}: model_input has {tokens.shape[0]} tokens; the model's context is "
            f"{limits.context_length}"
        )
    _check_ids(where, "model_input", tokens, limits.vocab_size)
    return tokens


def _array(where: str, key: str, value: Any, *, integer: bool) -> npt.NDArray[Any]:
    field = f"loss_fn_inputs[{key!r}]"
    if not isinstance(value, tinker.TensorData):
        raise UserError(f"{where}: {field} is not a tensor")
    try:
        arr = _dense(value)
    except (ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise UserError(f"{where}: {field} is malformed: {exc}") from exc
    if integer and arr.dtype.kind not in "iu":
        raise UserError(f"{where}: {field} must be int64, got {value.dtype}")
    if arr.dtype.kind not in "iuf":
        raise UserError(f"{where}: {field} must be numeric, got {value.dtype}")
    return arr


def _dense(tensor: tinker.TensorData) -> npt.NDArray[Any]:
    """A dense numpy array of a TensorData (sparse CSR densified with zeros, no torch)."""
    values = np.asarray(tensor.to_numpy())
    if tensor.sparse_crow_indices is None:
        return values.reshape(tensor.shape) if tensor.shape is not None else values
    if tensor.shape is None or tensor.sparse_col_indices is None:
        raise ValueError("a sparse tensor needs its shape and column indices")
    dense = np.zeros(tensor.shape, dtype=values.dtype)
    crow = np.asarray(tensor.sparse_crow_indices, dtype=np.int64)
    rows = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
    dense[rows, np.asarray(tensor.sparse_col_indices, dtype=np.int64)] = values
    return dense


def _float(where: str, key: str, value: Any, shape: list[int]) -> FloatArray:
    arr = _array(where, key, value, integer=False)
    field = f"loss_fn_inputs[{key!r}]"
    if list(arr.shape) != shape:
        raise UserError(
            f"{where}: {field} has shape {list(arr.shape)}; expected {shape} "
            "(it must match target_tokens / the model_input length)"
        )
    out = arr.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        pos = np.argwhere(bad)[0].tolist()
        raise UserError(f"{where}: {field} holds a non-finite value at index {pos}")
    return out


def _check_ids(where: str, field: str, ids: npt.NDArray[Any], vocab_size: int) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        pos = np.argwhere(bad)[0].tolist()
        raise UserError(
            f"{where}: {field} holds token id {int(ids[tuple(pos)])} at index {pos}, "
            f"outside the vocabulary [0, {vocab_size})"
        )


def non_finite_loss(index: int) -> UserError:
    """The error for a datum whose loss came out non-finite from finite inputs."""
    return UserError(
        f"datum {index}: the loss is not finite (check loss_fn_inputs['logprobs'] "
        "and ['advantages'])"
    )


# --------------------------------------------------------------------------- models


def unknown_model(model_id: str) -> UserError:
    return UserError(f"unknown model_id {model_id!r}")


def frozen_model(model_id: str, what: str) -> UserError:
    return UserError(f"model {model_id!r} is a frozen base-only model; it cannot {what}")


def check_model_spec(spec: Any) -> None:
    """Check a `ModelSpec` (typed loosely: the request is untrusted).

    Raises:
        UserError: An empty base model, a LoRA rank that is not a non-negative integer,
            a non-positive alpha, or LoRA with nothing to train.
    """
    if not spec.base_model:
        raise UserError("base_model must not be empty")
    rank = spec.lora_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise UserError(f"lora_config.rank must be a non-negative integer, got {rank!r}")
    if spec.lora_alpha is not None:
        _check_number("lora_config.alpha", spec.lora_alpha, POSITIVE)
    trains_nothing = not (spec.train_attn or spec.train_mlp or spec.train_unembed)
    if rank > 0 and not spec.base_only and trains_nothing:
        raise UserError("LoRA needs at least one of train_attn, train_mlp, train_unembed")


# --------------------------------------------------------------------------- optimizer

#: The allowed range of each ``tinker.AdamParams`` field.
ADAM_RANGES: Final[dict[str, Interval]] = {
    "learning_rate": NON_NEGATIVE,
    "beta1": UNIT_OPEN_ABOVE,
    "beta2": UNIT_OPEN_ABOVE,
    "eps": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "grad_clip_norm": NON_NEGATIVE,
}
NORMALIZATIONS: Final = ("none", "num_loss_tokens", "num_sequences")


def check_export_kind(checkpoint_type: str, engine: str, kinds: Sequence[str]) -> str:
    """The ``checkpoint_type`` of a sampler export, lower-cased, if the engine writes it.

    Raises:
        UserError: It is not one of ``kinds``, the types the ``engine`` writes.
    """
    kind = str(checkpoint_type).lower()
    if kind not in kinds:
        supported = f"the {engine} engine; use one of {list(kinds)}"
        raise UserError(f"checkpoint_type {checkpoint_type!r} is not supported by {supported}")
    return kind


def check_adam_params(params: tinker.AdamParams) -> None:
    """Refuse hyperparameters that would corrupt the weights.

    Raises:
        UserError: A field is not a finite number in its `ADAM_RANGES` range.
    """
    for name, allowed in ADAM_RANGES.items():
        _check_number(f"adam_params.{name}", getattr(params, name), allowed)


def normalization_mode(value: object) -> str:
    """``grad_accumulation_normalization`` (None, a string or a str enum) as a mode name.

    Raises:
        UserError: The value names no mode of `NORMALIZATIONS`.
    """
    if value is None:
        return "none"
    mode = str(getattr(value, "value", value)).lower()
    if mode not in NORMALIZATIONS:
        raise UserError(
            f"grad_accumulation_normalization must be one of {list(NORMALIZATIONS)}, got {value!r}"
        )
    return mode


# --------------------------------------------------------------------------- sampling


#: The widest top-k (and alternative-token draw, and set of distinct target ids) a
#: sampling request may ask for, and the most cells (positions × width) it may fill:
#: each cell is a logprob the trainer computes, stores and sends.
MAX_LOGPROB_WIDTH: Final = 1024
MAX_LOGPROB_CELLS: Final = 1 << 20


@attrs.frozen(kw_only=True)
class SamplingRequest:
    """A checked sampling request, what engines generate from.

    Attributes:
        prompt: The prompt's token ids (in the vocabulary, shorter than the context).
        num_samples: How many sequences, at least 1.
        params: Checked sampling parameters.
        prompt_logprobs: Also score the prompt.
        topk_prompt_logprobs: The k most likely tokens at every prompt position after
            the first (0: none).
        topk_sample_logprobs: The k most likely tokens at every sampled position (0: none).
        target_prompt_logprobs: Token ids to score, (len(prompt) - 1, K): cell
            ``[i, j]`` at prompt position ``i + 1``; ``-1`` asks nothing. None: none.
        prompt_alt_tokens_k: Draws at every prompt position after the first (0: none).
    """

    prompt: list[int]
    num_samples: int
    params: tinker.SamplingParams
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: IntArray | None = attrs.field(default=None, eq=False)
    prompt_alt_tokens_k: int = 0


def check_sampling(
    prompt: Sequence[int],
    num_samples: int,
    params: tinker.SamplingParams,
    limits: Limits,
    *,
    prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
    topk_sample_logprobs: int = 0,
    target_prompt_logprobs: npt.ArrayLike | None = None,
    prompt_alt_tokens_k: int = 0,
) -> SamplingRequest:
    """Check a sampling request against the model it samples from.

    Raises:
        UserError: A parameter is out of range, the prompt is empty, does not fit the
            context or holds a token outside the vocabulary, ``stop`` has entries
            that are neither token ids nor non-empty strings, a top-k or draw count is
            negative or too wide, or ``target_prompt_logprobs`` has the wrong shape,
            ids outside the vocabulary, none at all, or too many.
    """
    count: object = num_samples  # checked at run time: the request is untrusted
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"num_samples must be an integer >= 1, got {count!r}")
    if not prompt:
        raise UserError("prompt is empty")
    values: Sequence[object] = prompt  # checked at run time: the request is untrusted
    for i, tok in enumerate(values):
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < limits.vocab_size:
            raise UserError(
                f"prompt token {i} is {tok!r}, outside the vocabulary [0, {limits.vocab_size})"
            )
    if len(prompt) >= limits.context_length:
        raise UserError(
            f"prompt has {len(prompt)} tokens; the model's context is {limits.context_length}"
        )
    if params.max_tokens is not None:
        _check_number("sampling_params.max_tokens", params.max_tokens, NON_NEGATIVE)
    _check_number("sampling_params.temperature", params.temperature, NON_NEGATIVE)
    _check_number("sampling_params.top_p", params.top_p, Interval(0.0, 1.0, lo_open=True))
    if isinstance(params.top_k, bool) or not isinstance(params.top_k, int):
        raise UserError(f"sampling_params.top_k must be an integer, got {params.top_k!r}")
    stop = params.stop
    if stop is not None:
        for item in [stop] if isinstance(stop, str) else list(stop):
            is_id = isinstance(item, int) and not isinstance(item, bool)
            if not (is_id or (isinstance(item, str) and item)):
                raise UserError(
                    f"sampling_params.stop entries must be token ids or non-empty strings, "
                    f"got {item!r}"
                )
    positions = len(prompt)
    room = limits.context_length - positions
    generated = num_samples * (room if params.max_tokens is None else min(params.max_tokens, room))
    widths = {
        "topk_prompt_logprobs": (topk_prompt_logprobs, positions),
        "topk_sample_logprobs": (topk_sample_logprobs, generated),
        "prompt_alt_tokens_k": (prompt_alt_tokens_k, positions),
    }
    for field, (width, cells_per_width) in widths.items():
        _check_width(field, width, limits, cells_per_width)
    targets = None
    if target_prompt_logprobs is not None:
        targets = _check_targets(target_prompt_logprobs, limits, positions)
    return SamplingRequest(
        prompt=list(prompt),
        num_samples=num_samples,
        params=params,
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=topk_prompt_logprobs,
        topk_sample_logprobs=topk_sample_logprobs,
        target_prompt_logprobs=targets,
        prompt_alt_tokens_k=prompt_alt_tokens_k,
    )


def _check_width(field: str, width: object, limits: Limits, positions: int) -> None:
    """A top-k or draw count: an integer from 0 to the vocabulary (and
    `MAX_LOGPROB_WIDTH`) whose cells, ``positions`` rows of it, fit `MAX_LOGPROB_CELLS`
    (the rows of sampled top-k are every token the request may generate)."""
    most = min(limits.vocab_size, MAX_LOGPROB_WIDTH)
    if isinstance(width, bool) or not isinstance(width, int) or not 0 <= width <= most:
        raise UserError(f"{field} must be an integer in [0, {most}], got {width!r}")
    _check_cells(field, positions, width)


def _check_cells(field: str, positions: int, width: int) -> None:
    if positions * width > MAX_LOGPROB_CELLS:
        raise UserError(
            f"{field}: {positions} positions × {width} = {positions * width} logprobs, "
            f"more than the {MAX_LOGPROB_CELLS} one request may ask for"
        )


def _check_targets(value: npt.ArrayLike, limits: Limits, positions: int) -> IntArray:
    """``target_prompt_logprobs`` as a (len(prompt) - 1, K) int64 array of token ids or
    ``-1``, naming at least one id; its cost is len(prompt) × the distinct ids."""
    field = "target_prompt_logprobs"
    targets = np.asarray(value)
    if targets.dtype.kind not in "iu":
        raise UserError(f"{field} must hold integer token ids, got dtype {targets.dtype}")
    if targets.ndim != 2 or targets.shape[0] != positions - 1:
        raise UserError(
            f"{field} must have shape [len(prompt) - 1, K] = [{positions - 1}, K], "
            f"got {list(targets.shape)}"
        )
    bad = np.argwhere((targets < -1) | (targets >= limits.vocab_size))
    if bad.size:
        row, col = (int(x) for x in bad[0])
        raise UserError(
            f"{field}[{row}][{col}] is {int(targets[row, col])}: a token id in "
            f"[0, {limits.vocab_size}) or -1 for nothing"
        )
    distinct = np.unique(targets[targets >= 0]).size
    if distinct == 0:
        raise UserError(f"{field} names no token id (every cell is -1)")
    if distinct > MAX_LOGPROB_WIDTH:
        raise UserError(f"{field} names {distinct} distinct token ids; at most {MAX_LOGPROB_WIDTH}")
    _check_cells(field, positions, distinct)
    return targets.astype(np.int64)
