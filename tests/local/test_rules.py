"""The engine-independent rules: both engines refuse the same hostile requests with
exactly the same messages, and the loss catalogue's rules (unknown config keys, all
missing inputs) read as the losses reference says."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tinker
import torch
from shared import BASE_MODEL as BASE
from shared import sample_request
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from firetitan.local import loss_graphs
from firetitan.local.engine import Engine, ModelSpec, SampleSource, UserError
from firetitan.local.null_engine import NullEngine
from firetitan.local.rules import LOSSES, Interval
from firetitan.local.torch import TorchEngine

TOKENS = [1, 2, 3, 4]
N = len(TOKENS)


def _datum(tokens: list[int] = TOKENS, **inputs: Any) -> tinker.Datum:
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens),
        loss_fn_inputs={k: v for k, v in inputs.items() if v is not None},
    )


def _rl(**override: Any) -> tinker.Datum:
    inputs: dict[str, Any] = {
        "target_tokens": np.asarray(TOKENS, np.int64),
        "logprobs": np.full(N, -1.0, np.float32),
        "advantages": np.ones(N, np.float32),
    }
    return _datum(**{**inputs, **override})


def _gspo(mask: Any = None, **override: Any) -> tinker.Datum:
    """A ``gspo`` datum; ``mask`` defaults to marking every position."""
    marks = np.ones(N, np.float32) if mask is None else mask
    return _rl(sequence_ratio_mask=marks, **override)


SFT = _datum(target_tokens=np.asarray(TOKENS, np.int64))
Call = Callable[[Engine, int, int], object]  # (engine, vocab size, context length)


def _fb(data: list[tinker.Datum], loss_fn: str = "cross_entropy", cfg: Any = None) -> Call:
    return lambda e, _v, _c: e.forward_backward("m", data, loss_fn, cfg)


def _step(**adam: Any) -> Call:
    return lambda e, _v, _c: e.optim_step("m", tinker.AdamParams(**adam), None)


def _sample(prompt: list[int] = TOKENS, n: int = 1, **params: Any) -> Call:
    source = SampleSource(model_id="m")
    return lambda e, _v, _c: e.sample(
        source, sample_request(prompt, n, tinker.SamplingParams(**params))
    )


def _graph(fn: Callable[..., Any], **ranks: int) -> loss_graphs.LossGraph:
    """``fn`` traced and encoded by tinker, checked as the trainer checks an upload."""
    handle = trace_loss(fn, {"logprobs": 1, **ranks}, "s")  # type: ignore[arg-type]
    return loss_graphs.check_graph(
        loss_id="s:loss:0",
        session_id="s",
        name=handle.name,
        inputs=[i.model_dump() for i in handle.inputs],
        graph=encode_graph(handle).model_dump(mode="json"),
    )


def _shape_clash(logprobs: Any, advantages: Any) -> Any:
    return (logprobs[:2] * advantages).sum(), {}


def _huge_integer(logprobs: Any, advantages: Any) -> Any:
    n = logprobs.shape[0] ** 40
    return (logprobs * advantages).sum() * n, {}


def _matrix(logprobs: Any, advantages: Any) -> Any:
    return logprobs.unsqueeze(-1) * advantages, {}


def _constant(logprobs: Any, advantages: Any) -> Any:
    return advantages.sum() + 0 * logprobs.detach().sum(), {}


def _custom(data: list[tinker.Datum], graph: loss_graphs.LossGraph | None, cfg: Any) -> Call:
    return lambda e, _v, _c: e.forward_backward("m", data, "custom", cfg, graph)


def _scores(**options: Any) -> Call:
    """A sample asking for extra logprob results (``options`` of `Engine.sample`)."""
    source = SampleSource(model_id="m")
    params = tinker.SamplingParams(max_tokens=2)
    return lambda e, _v, _c: e.sample(source, sample_request(TOKENS, 1, params, **options))


def _targets(*cells: tuple[int, int, int], rows: int = N - 1, k: int = 2) -> np.ndarray:
    ids = np.full((rows, k), -1, dtype=np.int64)
    for row, col, value in cells:
        ids[row, col] = value
    return ids


ID = {"loss_id": "s:loss:0"}
HOSTILE: dict[str, Call] = {
    "custom loss config": _custom([SFT], None, {"loss_id": "s:loss:0", "beta": 0.1}),
    "custom loss not uploaded": _custom([SFT], None, ID),
    "custom loss input missing": _custom([SFT], _graph(_shape_clash, advantages=1), ID),
    "custom loss input of another rank": _custom(
        [_rl(advantages=np.ones((N, 2), np.float32))], _graph(_shape_clash, advantages=1), ID
    ),
    "custom loss 2-D logprobs for 1-D targets": _custom(
        [_rl()], _graph(_shape_clash, logprobs=2, advantages=1), ID
    ),
    "custom loss node fails": _custom([_rl()], _graph(_shape_clash, advantages=1), ID),
    "custom loss integer grows": _custom([_rl()], _graph(_huge_integer, advantages=1), ID),
    "custom loss not a scalar": _custom([_rl()], _graph(_matrix, advantages=1), ID),
    "custom loss without gradient": _custom([_rl()], _graph(_constant, advantages=1), ID),
    "unknown loss": _fb([SFT], "mse"),
    "misspelt clip key": _fb([_rl()], "ppo", {"clip_hihg_threshold": 1.3}),
    "epsilon-style clip key": _fb([_rl()], "ppo", {"clip_eps": 0.2}),
    "beta for ppo": _fb([_rl()], "ppo", {"beta": 0.1}),
    "clip bounds reversed": _fb(
        [_rl()], "cispo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}
    ),
    "clip as a string": _fb([_rl()], "ppo", {"clip_low_threshold": "0.8"}),
    "negative beta": _fb([_rl()], "dro", {"beta": -0.1}),
    "gspo inputs missing": _fb([_gspo(), _datum(sequence_ratio_mask=np.ones(N))], "gspo"),
    "gspo mask marks nothing": _fb([_gspo(np.zeros(N, np.float32))], "gspo"),
    "gspo mask shape": _fb([_gspo(np.ones(N + 1, np.float32))], "gspo"),
    "gspo mask nan": _fb([_gspo(np.full(N, np.nan, np.float32))], "gspo"),
    "gspo clip bounds reversed": _fb(
        [_gspo()], "gspo", {"clip_low_threshold": 1.3, "clip_high_threshold": 1.2}
    ),
    "beta for gspo": _fb([_gspo()], "gspo", {"beta": 0.1}),
    "gspo sequence ratio overflows": _fb(
        [_gspo(), _gspo(logprobs=np.full(N, -1e4, np.float32), advantages=-np.ones(N, np.float32))],
        "gspo",
    ),
    "candidates support": _fb([SFT], "cross_entropy", {"target_logprob_support": "candidates"}),
    "empty data": _fb([]),
    "all RL inputs missing": _fb([_rl(), _datum()], "ppo"),
    "two RL inputs missing": _fb([_datum(target_tokens=np.asarray(TOKENS, np.int64))], "dro"),
    "target missing": _fb([SFT, _datum()]),
    "short targets": _fb([_datum(target_tokens=np.zeros(N - 1, np.int64))]),
    "float targets": _fb([_datum(target_tokens=np.zeros(N, np.float32))]),
    "weights shape": _fb(
        [_datum(target_tokens=np.zeros(N, np.int64), weights=np.ones(N + 1, np.float32))]
    ),
    "inf weight": _fb(
        [_datum(target_tokens=np.zeros(N, np.int64), weights=np.full(N, np.inf, np.float32))]
    ),
    "nan advantage": _fb([_rl(), _rl(advantages=np.full(N, np.nan, np.float32))], "dro"),
    "2-D targets for an RL loss": _fb([_rl(target_tokens=np.zeros((N, 2), np.int64))], "ppo"),
    "input token out of vocab": lambda e, v, _c: e.forward(
        "m", [_datum([1, v], target_tokens=np.zeros(2, np.int64))], "cross_entropy", None
    ),
    "negative target": _fb([_datum(target_tokens=np.full(N, -1, np.int64))]),
    "target out of vocab": lambda e, v, _c: e.forward(
        "m", [_datum(target_tokens=np.full(N, v, np.int64))], "cross_entropy", None
    ),
    "empty input": _fb([_datum([], target_tokens=np.zeros(0, np.int64))]),
    "input longer than the context": lambda e, _v, c: e.forward(
        "m", [_datum([1] * (c + 1), target_tokens=np.ones(c + 1, np.int64))], "cross_entropy", None
    ),
    "loss overflows": _fb(
        [_rl(), _rl(logprobs=np.full(N, -1e4, np.float32))], "importance_sampling"
    ),
    "unknown model": lambda e, _v, _c: e.forward("nope", [SFT], "cross_entropy", None),
    "frozen model forward_backward": lambda e, _v, _c: e.forward_backward(
        "ref", [SFT], "cross_entropy", None
    ),
    "frozen model optim_step": lambda e, _v, _c: e.optim_step("ref", tinker.AdamParams(), None),
    "eps zero": _step(eps=0.0),
    "negative learning rate": _step(learning_rate=-1e-3),
    "beta1 one": _step(beta1=1.0),
    "beta2 nan": _step(beta2=math.nan),
    "negative weight decay": _step(weight_decay=-0.1),
    "negative clip norm": _step(grad_clip_norm=-1.0),
    "unknown normalization": lambda e, _v, _c: e.optim_step("m", tinker.AdamParams(), "mean"),
    "negative LoRA rank": lambda e, _v, _c: e.create_model(
        "x", ModelSpec(base_model=BASE, lora_rank=-1)
    ),
    "zero LoRA alpha": lambda e, _v, _c: e.create_model(
        "x", ModelSpec(base_model=BASE, lora_rank=4, lora_alpha=0)
    ),
    "LoRA that trains nothing": lambda e, _v, _c: e.create_model(
        "x",
        ModelSpec(
            base_model=BASE, lora_rank=4, train_attn=False, train_mlp=False, train_unembed=False
        ),
    ),
    "duplicate model": lambda e, _v, _c: e.create_model("m", ModelSpec(base_model=BASE)),
    "empty base model": lambda e, _v, _c: e.create_model("x", ModelSpec(base_model="")),
    "zero samples": _sample(n=0),
    "empty prompt": _sample(prompt=[]),
    "prompt token out of vocab": lambda e, v, _c: e.sample(
        SampleSource(model_id="m"), sample_request([1, v], 1, tinker.SamplingParams())
    ),
    "prompt fills the context": lambda e, _v, c: e.sample(
        SampleSource(model_id="m"), sample_request([1] * c, 1, tinker.SamplingParams())
    ),
    "negative max_tokens": _sample(max_tokens=-1),
    "negative temperature": _sample(temperature=-1.0),
    "top_p zero": _sample(top_p=0.0),
    "top_p above one": _sample(top_p=1.5),
    "empty stop string": _sample(stop=[""]),
    "negative top-k prompt logprobs": _scores(topk_prompt_logprobs=-1),
    "top-k prompt logprobs as a float": _scores(topk_prompt_logprobs=2.0),
    "top-k wider than allowed": _scores(topk_sample_logprobs=100_000),
    "negative alternative tokens": _scores(prompt_alt_tokens_k=-2),
    "targets with too few rows": _scores(target_prompt_logprobs=_targets((0, 0, 5), rows=N - 2)),
    "targets as 1-D": _scores(target_prompt_logprobs=np.arange(N - 1)),
    "targets as floats": _scores(target_prompt_logprobs=np.zeros((N - 1, 1), np.float32)),
    "targets naming nothing": _scores(target_prompt_logprobs=_targets()),
    "target id below -1": _scores(target_prompt_logprobs=_targets((1, 1, -3))),
    "target id out of vocab": lambda e, v, _c: e.sample(
        SampleSource(model_id="m"),
        sample_request(
            TOKENS,
            1,
            tinker.SamplingParams(max_tokens=2),
            target_prompt_logprobs=_targets((2, 0, v)),
        ),
    ),
    "sample an unknown model": lambda e, _v, _c: e.sample(
        SampleSource(model_id="nope"), sample_request(TOKENS, 1, tinker.SamplingParams())
    ),
    "two sample sources": lambda e, _v, _c: e.sample(
        SampleSource(model_id="m", base_model=BASE),
        sample_request(TOKENS, 1, tinker.SamplingParams()),
    ),
}


@pytest.fixture(scope="module")
def engines() -> tuple[tuple[Engine, int, int], tuple[Engine, int, int]]:
    """A tiny torch engine and a null engine with the same vocabulary and context, each
    with a trainable model ``m`` and a frozen ``ref``."""
    threads = torch.get_num_threads()
    torch_engine = TorchEngine(BASE, size="tiny", device="cpu", threads=1)
    torch.set_num_threads(threads)
    limits = torch_engine.source_limits(SampleSource(base_model=BASE))
    null_engine = NullEngine(
        BASE, vocab_size=limits.vocab_size, max_context_length=limits.context_length
    )
    for engine in (torch_engine, null_engine):
        engine.create_model("m", ModelSpec(base_model=BASE))
        engine.create_model("ref", ModelSpec(base_model=BASE, base_only=True))
    return (
        (torch_engine, limits.vocab_size, limits.context_length),
        (null_engine, limits.vocab_size, limits.context_length),
    )


def _refusal(engine: Engine, vocab: int, context: int, call: Call) -> str:
    with pytest.raises(UserError) as info:
        call(engine, vocab, context)
    return str(info.value)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_both_engines_refuse_alike(
    engines: tuple[tuple[Engine, int, int], tuple[Engine, int, int]], case: str
) -> None:
    (torch_engine, vocab, context), (null_engine, _, _) = engines
    call = HOSTILE[case]
    assert _refusal(torch_engine, vocab, context, call) == _refusal(
        null_engine, vocab, context, call
    )


def test_sampling_options_are_refused_by_name(
    engines: tuple[tuple[Engine, int, int], tuple[Engine, int, int]],
) -> None:
    (engine, vocab, context), _ = engines
    most = min(vocab, 1024)
    expected = {
        "negative top-k prompt logprobs": f"topk_prompt_logprobs must be an integer in "
        f"[0, {most}], got -1",
        "top-k wider than allowed": f"topk_sample_logprobs must be an integer in [0, {most}], "
        "got 100000",
        "negative alternative tokens": f"prompt_alt_tokens_k must be an integer in [0, {most}], "
        "got -2",
        "targets with too few rows": "target_prompt_logprobs must have shape "
        f"[len(prompt) - 1, K] = [{N - 1}, K], got [{N - 2}, 2]",
        "targets naming nothing": "target_prompt_logprobs names no token id (every cell is -1)",
        "target id out of vocab": f"target_prompt_logprobs[2][0] is {vocab}: a token id in "
        f"[0, {vocab}) or -1 for nothing",
    }
    for case, message in expected.items():
        assert _refusal(engine, vocab, context, HOSTILE[case]) == message


def test_both_engines_answer_sampling_options_in_the_same_shapes(
    engines: tuple[tuple[Engine, int, int], tuple[Engine, int, int]],
) -> None:
    """The null engine's extra results have the torch engine's shapes and empty cells."""
    answers = [
        engine.sample(
            SampleSource(model_id="m"),
            sample_request(
                TOKENS,
                2,
                tinker.SamplingParams(max_tokens=3, stop=[], seed=1),
                prompt_logprobs=True,
                topk_prompt_logprobs=3,
                topk_sample_logprobs=2,
                target_prompt_logprobs=_targets((1, 0, 5), (2, 1, 9)),
                prompt_alt_tokens_k=4,
            ),
        )
        for engine, _v, _c in engines
    ]

    def layout(res: tinker.SampleResponse) -> list[object]:
        assert res.topk_prompt_logprobs is not None and res.target_prompt_logprobs is not None
        assert res.prompt_alt_tokens is not None
        targets = res.target_prompt_logprobs.to_numpy()
        return [
            [row is None or len(row) for row in res.topk_prompt_logprobs],
            [
                None if s.topk_logprobs_np is None else s.topk_logprobs_np.token_ids.shape
                for s in res.sequences
            ],
            res.target_prompt_logprobs.dtype,
            (targets == 0.0).tolist(),
            res.prompt_alt_tokens.tokens.shape,
            res.prompt_alt_tokens.logprobs.shape,
        ]

    torch_answer, null_answer = answers
    assert layout(torch_answer) == layout(null_answer)
    assert layout(null_answer)[0] == [True, 3, 3, 3]
    assert layout(null_answer)[3] == [[True, True], [False, True], [True, False]]


# Messages in full: unknown config keys list the valid ones, all missing inputs are
# named at once, Adam's messages name the range.
MESSAGES = {
    "misspelt clip key": (
        "loss_fn_config has unknown key(s) ['clip_hihg_threshold'] for loss_fn 'ppo'; "
        "valid keys: ['clip_high_threshold', 'clip_low_threshold', 'target_logprob_support']"
    ),
    "all RL inputs missing": (
        "datum 1: loss_fn_inputs is missing 'target_tokens', 'logprobs', 'advantages', "
        "required by ppo (it needs target_tokens, logprobs, advantages)"
    ),
    "eps zero": "adam_params.eps must be a finite number > 0, got 0.0",
    "beta1 one": "adam_params.beta1 must be a finite number in [0, 1), got 1.0",
    "gspo mask marks nothing": (
        "datum 0: loss_fn_inputs['sequence_ratio_mask'] marks no position; gspo averages "
        "its sequence ratio over the marked (non-zero) positions"
    ),
}


@pytest.mark.parametrize("case", list(MESSAGES))
def test_refusals_say_exactly_what_is_wrong(
    engines: tuple[tuple[Engine, int, int], tuple[Engine, int, int]], case: str
) -> None:
    (engine, vocab, context), _ = engines
    assert _refusal(engine, vocab, context, HOSTILE[case]) == MESSAGES[case]


def test_catalogue_defaults_lie_in_their_ranges() -> None:
    for spec in LOSSES.values():
        for key in spec.config_keys().values():
            if key.allowed is not None:
                assert isinstance(key.default, float) and key.default in key.allowed
            else:
                assert key.default in key.choices
    assert 0.5 in Interval(0.0, 1.0, hi_open=True) and 1.0 not in Interval(0.0, 1.0, hi_open=True)
    assert math.nan not in Interval() and str(Interval(0.0, 1.0, lo_open=True)) == "in (0, 1]"
