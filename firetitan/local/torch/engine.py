"""`TorchEngine`: the local trainer's PyTorch backend.

One engine serves several models, keyed by ``model_id``:

* full-parameter (``lora_rank=0``): an own float32 copy of every base weight, all trained;
* LoRA (``lora_rank>0``): the frozen base weights, shared with every other model of the
  same base, plus `LoRALinear` adapters that are the only trainable parameters;
* base-only: the frozen base weights, for reference log-probabilities (``forward``).

Base weights come from a seeded stand-in of the named family (`models.build_standin`),
or, with ``weights=DIR``, from a local Hugging Face checkpoint that then serves every
``base_model`` name.

Numerics follow ``spec/losses.md`` (see `losses` and `optim`); checkpoints `state`;
sampler exports `exports`; generation `sampling`. Every public method holds one engine
lock, so calls from several threads run one at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import tinker
import torch
from torch import nn

from firetitan.local import loss_interpreter, rules
from firetitan.local.engine import Engine, ModelSpec, SamplerExport, SampleSource, UserError
from firetitan.local.loss_graphs import LossGraph, no_gradient
from firetitan.local.torch import exports, state
from firetitan.local.torch.inputs import collate, split_by_budget
from firetitan.local.torch.lora import (
    PEFT_PREFIX,
    LoraSettings,
    apply_lora,
    merged_state,
    peft_adapter_config,
)
from firetitan.local.torch.losses import per_datum_loss, target_logprobs
from firetitan.local.torch.models import (
    SIZES,
    build_standin,
    clone_trainable,
    context_length,
    derive_seed,
    load_pretrained,
    model_config,
    named_trainable,
    share_frozen,
    tensor_digest,
    unique_state,
    vocab_size,
)
from firetitan.local.torch.optim import AdamW, Window
from firetitan.local.torch.sampling import generate, plan_sampling
from firetitan.local.torch.snapshots import module_from_export
from firetitan.local.torch.tokenizer import ByteTokenizer, Tokenizer, load_hf_tokenizer

__all__ = ["TorchEngine"]

#: Largest padded logits tensor (B * T * vocab cells) of one micro-batch: 2**26 float32
#: cells are 256 MiB. A request above it runs as several forward/backward passes.
MAX_LOGIT_CELLS = 1 << 26
#: Sampler exports kept loaded for sampling.
EXPORT_CACHE_SIZE = 4
#: Names reported by ``supported_models`` for stand-ins (any name is accepted).
_ADVERTISED = (
    "accounts/fireworks/models/qwen3-8b",
    "accounts/fireworks/models/qwen3-4b",
    "accounts/fireworks/models/llama-v3p1-8b-instruct",
)


@attrs.define(eq=False)
class _Base:
    """Frozen base weights shared by the models of one base model."""

    name: str
    module: nn.Module
    _digest: str | None = None

    def digest(self) -> str:
        if self._digest is None:
            self._digest = tensor_digest(unique_state(self.module))
        return self._digest


@attrs.define(eq=False)
class _Model:
    """One served model and its training state."""

    spec: ModelSpec
    module: nn.Module
    base: _Base
    lora: LoraSettings | None
    optimizer: AdamW | None  # None for base-only models
    window: Window
    sample_rng: torch.Generator
    #: Digest and tensors of the latest sampler export, the usual reference of the next delta.
    last_export: tuple[str, dict[str, torch.Tensor]] | None = None


def pick_device(device: str) -> torch.device:
    """``\"auto\"``: CUDA when available, else the CPU; any other name as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchEngine(Engine):
    """Real training with PyTorch and transformers models.

    Args:
        base_model: The default base model name (reported by ``supported_models``).
        size: Stand-in preset, ``"tiny"`` or ``"small"`` (see `models.SIZES`).
        weights: A local Hugging Face directory to load real weights (and tokenizer,
            when present) from instead of stand-ins; every base model name then maps
            to these weights.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ...
            Choosing a device changes no process-wide torch setting.
        seed: Seeds stand-in weights, LoRA initialisation and unseeded sampling.
        threads: torch intra-op threads for the whole process; None means one thread
            for the ``tiny`` stand-in on CPU and torch's default otherwise.
        deterministic: On CUDA, switch the whole process to deterministic algorithms
            (``torch.use_deterministic_algorithms``, no cuDNN autotuning, no TF32), so
            that repeated runs are bit-identical at some cost in speed; these settings
            are process-wide, so they are only made when asked for. CPU runs are
            reproducible without them. The CUDA path has not yet run on a GPU.

    Raises:
        ValueError: Unknown ``size``, or ``weights`` is not a directory.
    """

    name = "torch"
    checkpoint_types = ("base", "delta", "merged_base")

    def __init__(
        self,
        base_model: str = "accounts/fireworks/models/qwen3-8b",
        size: str = "tiny",
        weights: str | Path | None = None,
        device: str = "auto",
        seed: int = 0,
        threads: int | None = None,
        deterministic: bool = False,
    ) -> None:
        if size not in SIZES:
            raise ValueError(f"unknown stand-in size {size!r}; choose one of {sorted(SIZES)}")
        self.base_model = base_model
        self.size = size
        self.seed = seed
        self.device = pick_device(device)
        if deterministic and self.device.type == "cuda":
            _deterministic_cuda()
        # The tiny stand-in gains nothing from intra-op parallelism, while spinning
        # OpenMP workers compete with the event loop (and an in-process client) for a
        # small machine's cores. torch's thread count is process-wide.
        if threads is None and self.device.type == "cpu" and size == "tiny":
            threads = 1
        if threads is not None:
            torch.set_num_threads(threads)
        self._lock = threading.RLock()
        self._models: dict[str, _Model] = {}
        self._bases: dict[str, _Base] = {}
        self._exports: OrderedDict[tuple[str, int, int], nn.Module] = OrderedDict()
        self._sample_calls = 0
        self._models_created = 0
        self._engine_rng = self._generator(derive_seed("engine-sampling", seed))
        self._tokenizer: Tokenizer = ByteTokenizer()
        self.weights = None if weights is None else Path(weights).resolve()
        if self.weights is not None:
            if not self.weights.is_dir():
                raise ValueError(f"weights directory {self.weights} does not exist")
            self._bases[""] = _Base(base_model, load_pretrained(self.weights).to(self.device))
            self._tokenizer = load_hf_tokenizer(self.weights) or self._tokenizer

    # ----------------------------------------------------------------- accessors

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the served models (`ByteTokenizer` for stand-ins)."""
        return self._tokenizer

    def module(self, model_id: str) -> nn.Module:
        """The torch module of a model, for inspection (do not modify it)."""
        with self._lock:
            return self._model(model_id).module

    def window_counts(self, model_id: str) -> tuple[int, int]:
        """``(loss tokens, sequences)`` accumulated since the model's last optim_step."""
        with self._lock:
            w = self._model(model_id).window
            return w.loss_tokens, w.sequences

    def _model(self, model_id: str) -> _Model:
        try:
            return self._models[model_id]
        except KeyError:
            raise rules.unknown_model(model_id) from None

    def _trainable(self, model_id: str, what: str) -> tuple[_Model, AdamW]:
        model = self._model(model_id)
        if model.optimizer is None:
            raise UserError(f"model {model_id!r} is a frozen base-only model; it cannot {what}")
        return model, model.optimizer

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _base(self, base_model: str) -> _Base:
        key = "" if self.weights is not None else base_model
        base = self._bases.get(key)
        if base is None:
            module = build_standin(base_model, self.size, self.seed).to(self.device)
            base = self._bases[key] = _Base(base_model, module)
        return base

    # ----------------------------------------------------------------- lifecycle

    def supported_models(self) -> list[dict[str, Any]]:
        with self._lock:
            if self.weights is not None:
                ctx = context_length(self._bases[""].module)
                return [{"model_name": self.base_model, "max_context_length": ctx}]
            ctx = SIZES[self.size].max_positions
            names = dict.fromkeys((self.base_model, *_ADVERTISED))
            return [{"model_name": n, "max_context_length": ctx} for n in names]

    def model_spec(self, model_id: str) -> ModelSpec | None:
        with self._lock:
            model = self._models.get(model_id)
            return None if model is None else model.spec

    def limits(self, model_id: str) -> rules.Limits:
        with self._lock:
            return _limits(self._model(model_id).module)

    def source_limits(self, source: SampleSource) -> rules.Limits:
        with self._lock:
            return _limits(self._sample_module(source)[0])

    def build_model(self, model_id: str, spec: ModelSpec) -> None:
        with self._lock:
            rank = spec.lora_rank
            base = self._base(spec.base_model)
            lora = None
            if spec.base_only:
                module = share_frozen(base.module)
            elif rank == 0:
                module = clone_trainable(base.module)
            else:
                lora = LoraSettings.from_flags(
                    rank=rank,
                    alpha=float(spec.lora_alpha if spec.lora_alpha is not None else 2 * rank),
                    seed=spec.lora_seed if spec.lora_seed is not None else self.seed,
                    attn=spec.train_attn,
                    mlp=spec.train_mlp,
                    unembed=spec.train_unembed,
                )
                module = share_frozen(base.module)
                try:
                    apply_lora(module, lora)
                except ValueError as exc:
                    raise UserError(str(exc)) from exc
            optimizer = None
            if not spec.base_only:
                optimizer = AdamW(named_trainable(module))
                optimizer.zero_grad()  # allocates the gradient buffers
            self._models[model_id] = _Model(
                spec=spec,
                module=module,
                base=base,
                lora=lora,
                optimizer=optimizer,
                window=Window(),
                sample_rng=self._generator(
                    derive_seed("model-sampling", self.seed, self._models_created)
                ),
            )
            self._models_created += 1

    def get_info(self, model_id: str) -> dict[str, Any]:
        with self._lock:
            model = self._model(model_id)
            return {
                "model_data": {
                    "arch": type(model.module).__name__,
                    "model_name": model.spec.base_model,
                    "tokenizer_id": self._tokenizer.name,
                },
                "is_lora": model.lora is not None,
                "lora_rank": 0 if model.lora is None else model.lora.rank,
                "model_name": model.spec.base_model,
            }

    def unload_model(self, model_id: str) -> None:
        with self._lock:
            self._models.pop(model_id, None)

    def close(self) -> None:
        with self._lock:
            self._models.clear()
            self._exports.clear()
            self._bases.clear()

    # ----------------------------------------------------------------- training

    def compute_loss(
        self, model_id: str, request: rules.LossRequest, *, train: bool
    ) -> tinker.ForwardBackwardOutput:
        with self._lock:
            model = self._model(model_id)
            datums = request.datums
            outputs: list[dict[str, tinker.TensorData]] = [{} for _ in datums]
            custom_metrics: list[dict[str, float]] = []
            groups = split_by_budget(datums, MAX_LOGIT_CELLS, vocab_size(model.module))
            accumulate: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
            if train and model.optimizer is not None:
                accumulate = model.optimizer.accumulating()  # all or nothing
            total = 0.0
            with accumulate:
                for group in groups:
                    total += self._run_group(model, request, group, outputs, custom_metrics, train)
            if train:
                model.window.loss_tokens += request.loss_tokens()
                model.window.sequences += request.sequences()
            return self.loss_output(request, outputs, total, custom_metrics)

    def _run_group(
        self,
        model: _Model,
        request: rules.LossRequest,
        group: Sequence[int],
        outputs: list[dict[str, tinker.TensorData]],
        custom_metrics: list[dict[str, float]],
        train: bool,
    ) -> float:
        datums = request.datums
        batch = collate([datums[i] for i in group], self.device)
        grad_mode = contextlib.nullcontext() if train else torch.no_grad()
        with grad_mode:
            with self._autocast():
                logits = model.module(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits
            lp = target_logprobs(logits, batch.targets)  # float32, outside autocast
            if request.graph is None:
                losses = per_datum_loss(request.loss_fn, lp, batch, request.config)
            else:
                losses = self._graph_losses(request.graph, lp, datums, group, custom_metrics)
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                row = int((~finite).nonzero()[0, 0])
                if not bool(torch.isfinite(lp[row]).all()):
                    raise UserError(
                        f"datum {group[row]}: the model's log-probabilities are not finite "
                        "(its weights have grown too large, e.g. from a very large "
                        "learning_rate; load an earlier checkpoint)"
                    )
                raise rules.non_finite_loss(group[row])
            loss = losses.sum()
            if train:
                if not loss.requires_grad:  # only an uploaded loss can ignore the logprobs
                    assert request.graph is not None
                    raise no_gradient(request.graph)
                torch.autograd.backward(loss)
        lp_cpu = lp.detach().cpu().numpy()
        for row, i in enumerate(group):
            d = datums[i]
            arr = lp_cpu[row, : d.length, : d.width]
            arr = arr[:, 0] if d.targets.ndim == 1 else arr
            outputs[i] = {"logprobs": tinker.TensorData.from_numpy(arr.copy())}
        return float(loss.detach())

    def _graph_losses(
        self,
        graph: LossGraph,
        lp: torch.Tensor,
        datums: Sequence[rules.DatumArrays],
        group: Sequence[int],
        custom_metrics: list[dict[str, float]],
    ) -> torch.Tensor:
        """Each datum's uploaded loss on its own logprobs, shape (len(group),)."""
        losses = []
        for row, i in enumerate(group):
            d = datums[i]
            logprobs = lp[row, : d.length, : d.width]
            logprobs = logprobs[:, 0] if d.targets.ndim == 1 else logprobs
            values = [logprobs, *(torch.from_numpy(a).to(self.device) for a in d.custom_inputs)]
            loss, metrics = loss_interpreter.run(graph, values, i)
            losses.append(loss.to(torch.float32))
            custom_metrics.append(metrics)
        return torch.stack(losses)

    def compute_optim_step(
        self, model_id: str, adam_params: tinker.AdamParams, normalization: str
    ) -> dict[str, float]:
        with self._lock:
            model, optimizer = self._trainable(model_id, "take an optimizer step")
            return optimizer.apply(adam_params, normalization=normalization, window=model.window)

    # ----------------------------------------------------------------- checkpoints

    def _describe(self, model: _Model, optimizer: AdamW) -> state.StateDescription:
        config = model_config(model.module)
        return {
            "architecture": {
                "class": type(model.module).__name__,
                "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_hidden_layers,
                "vocab_size": config.vocab_size,
            },
            "base_model": model.spec.base_model,
            "base_digest": model.base.digest() if model.lora is not None else None,
            "lora": None
            if model.lora is None
            else {
                "rank": model.lora.rank,
                "alpha": model.lora.alpha,
                "targets": list(model.lora.targets),
            },
            "params": {
                n: [list(p.shape), str(p.dtype).removeprefix("torch.")]
                for n, p in optimizer.params.items()
            },
        }

    def save_state(self, model_id: str, directory: Path) -> None:
        with self._lock:
            state.save_state(directory, self._training_state(model_id, "save training state"))

    def load_state(self, model_id: str, directory: Path, *, with_optimizer: bool) -> None:
        with self._lock:
            training = self._training_state(model_id, "load training state")
            state.load_state(directory, training, with_optimizer=with_optimizer)

    def _training_state(self, model_id: str, what: str) -> state.TrainingState:
        model, optimizer = self._trainable(model_id, what)
        return state.TrainingState(
            description=self._describe(model, optimizer),
            optimizer=optimizer,
            window=model.window,
            sample_rng=model.sample_rng,
        )

    # ----------------------------------------------------------------- sampler exports

    def write_sampler_export(self, model_id: str, export: SamplerExport) -> dict[str, Any]:
        kind, previous = export.kind, export.previous
        with self._lock:
            model = self._model(model_id)
            if kind == "merged_base" and model.lora is None:
                raise UserError("checkpoint_type 'merged_base' needs a LoRA model")
            extra: dict[str, Any] = {
                "base_model": model.spec.base_model,
                "lora_rank": 0 if model.lora is None else model.lora.rank,
            }
            if model.lora is not None and kind != "merged_base":
                fmt = "peft"
                tensors = {
                    PEFT_PREFIX + n: _cpu(p) for n, p in named_trainable(model.module).items()
                }
                config = peft_adapter_config(model.lora, model.spec.base_model)
                extra["base_digest"] = model.base.digest()
            else:
                fmt = "hf"
                merged = kind == "merged_base"
                source = merged_state(model.module) if merged else unique_state(model.module)
                tensors = {n: _cpu(t) for n, t in source.items()}
                config = json.loads(model_config(model.module).to_json_string())
                tied = getattr(model_config(model.module), "tie_word_embeddings", False)
                if merged and tied and "lm_head.weight" in tensors:
                    config["tie_word_embeddings"] = False  # the adapter untied the output layer
            reference = None
            if kind == "delta":
                assert previous is not None  # checked by save_for_sampler
                reference = (previous, self._previous_export(model, previous, fmt))
            meta = exports.write_export(
                export.directory,
                fmt=fmt,
                tensors=tensors,
                config=config,
                checkpoint_type="delta" if kind == "delta" else "base",
                previous=reference,
                extra=extra,
            )
            if kind != "merged_base":
                model.last_export = (meta["digest"], tensors)
            return {**meta, "checkpoint_type": kind}

    def _previous_export(self, model: _Model, previous: Path, fmt: str) -> dict[str, torch.Tensor]:
        try:
            meta = exports.read_export_meta(previous)
            if meta["format"] != fmt:
                raise ValueError(f"it is a {meta['format']} export, this model exports {fmt}")
            if model.last_export is not None and model.last_export[0] == meta.get("digest"):
                return model.last_export[1]
            return exports.rebuild_snapshot(previous)
        except ValueError as exc:
            raise UserError(f"previous export {previous.name!r} cannot be used: {exc}") from exc

    # ----------------------------------------------------------------- sampling

    def compute_sample(
        self, source: SampleSource, request: rules.SamplingRequest
    ) -> tinker.SampleResponse:
        with self._lock:
            module, default_rng = self._sample_module(source)
            context = _limits(module).context_length
            prompt = request.prompt
            plan = plan_sampling(prompt, request.params, tokenizer=self._tokenizer, context=context)
            generator = default_rng if plan.seed is None else self._generator(plan.seed)
            self._sample_calls += 1
            return generate(
                module,
                request,
                plan,
                generator=generator,
                tokenizer=self._tokenizer,
                device=self.device,
                autocast=self._autocast(),
                id_prefix=f"s{self._sample_calls}",
            )

    def _sample_module(self, source: SampleSource) -> tuple[nn.Module, torch.Generator]:
        """The module ``source`` names, and the generator for unseeded sampling from it."""
        if source.export_dir is not None:
            return self._export_module(Path(source.export_dir)), self._engine_rng
        if source.model_id is not None:
            model = self._model(source.model_id)
            return model.module, model.sample_rng
        assert source.base_model is not None
        return self._base(source.base_model).module, self._engine_rng

    def _export_module(self, export_dir: Path) -> nn.Module:
        try:
            stat = (export_dir / exports.EXPORT_FILE).stat()
        except OSError as exc:
            raise UserError(f"{export_dir.name!r} is not a sampler export") from exc
        # The folder of a name can be replaced by a newer export: key on the file identity.
        key = (str(export_dir.resolve()), stat.st_ino, stat.st_mtime_ns)
        module = self._exports.get(key)
        if module is None:
            try:
                module = self._load_export(export_dir)
            except ValueError as exc:
                raise UserError(
                    f"sampler export {export_dir.name!r} cannot be loaded: {exc}"
                ) from exc
            self._exports[key] = module
            while len(self._exports) > EXPORT_CACHE_SIZE:
                self._exports.popitem(last=False)
        self._exports.move_to_end(key)
        return module

    def _load_export(self, export_dir: Path) -> nn.Module:
        meta = exports.read_export_meta(export_dir)
        tensors = exports.rebuild_snapshot(export_dir)
        return module_from_export(
            export_dir, meta, tensors, base=self._base_weights, device=self.device
        )

    def _base_weights(self, name: str) -> tuple[nn.Module, str]:
        base = self._base(name)
        return base.module, base.digest()


def _limits(module: nn.Module) -> rules.Limits:
    return rules.Limits(vocab_size=vocab_size(module), context_length=context_length(module))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _deterministic_cuda() -> None:
    """Make CUDA kernels reproducible. cuBLAS reads its workspace setting when it first
    initialises, so this must run before any CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
