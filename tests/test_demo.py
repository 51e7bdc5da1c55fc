"""``firetitan demo``: a shortened run end to end, its outputs, and its parts."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shared import save_tiny_llama, save_tokenizer

from firetitan.cli import main
from firetitan.demo import DemoConfig, run_demo, task
from firetitan.demo.report import first_last_means
from firetitan.local import LocalTrainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in rows)
    return rows


def _check_outputs(out_dir: Path, cfg: DemoConfig) -> dict[str, Any]:
    rows = _rows(out_dir / "metrics.jsonl")
    sft = [r for r in rows if r["phase"] == "sft"]
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(sft) + len(rl) == len(rows)
    assert [r["step"] for r in sft] == list(range(cfg.sft_steps))
    assert [r["step"] for r in rl] == list(range(cfg.rl_steps))
    for r in sft:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["tokens_per_s"] > 0
    for r in rl:
        assert 0.0 <= r["reward_mean"] <= 1.0
        assert math.isfinite(r["loss"]) and math.isfinite(r["kl"])
        assert r["export"] in ("base", "delta")
    drill_step = cfg.rl_steps // 2
    assert "resumed_from" in rl[drill_step]

    plot = out_dir / "curves.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC

    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    rewards = [r["reward_mean"] for r in rl]
    assert summary["reward_first5_mean"] == pytest.approx(first_last_means(rewards)[0])
    assert summary["reward_last5_mean"] == pytest.approx(first_last_means(rewards)[1])
    assert summary["resume_drill"]["step"] == drill_step
    for key in ("answers_before_rl", "answers_after_rl"):
        assert set(summary[key]) == {task.prompt_text(d) for d in task.DIGITS}
    return summary


def test_quick_demo_on_the_embedded_trainer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    out_dir = (tmp_path / "out").resolve()
    for name in ("metrics.jsonl", "curves.png", "summary.json"):
        assert str(out_dir / name) in out
    summary = _check_outputs(out_dir, DemoConfig().quick())
    # save_state + load_state_with_optimizer restore the weights bit for bit.
    assert summary["resume_drill"]["max_abs_logprob_diff"] == 0.0
    # Rollouts came from the local deployment, each export hot-loaded into it.
    assert summary["rollouts_from"].startswith("deployment http://127.0.0.1:")


def test_quick_demo_against_a_remote_trainer(tmp_path: Path) -> None:
    # A trainer the demo did not start (the null engine: protocol only, no model),
    # reached by URL and key as a remote one would be.
    with LocalTrainer("null") as trainer:
        cfg = DemoConfig(
            out_dir=tmp_path, progress=False, base_url=trainer.base_url, api_key=trainer.api_key
        ).quick()
        result = run_demo(cfg, out=io.StringIO())
    assert result.metrics_path == tmp_path / "metrics.jsonl"
    assert result.rollouts_from == "trainer"  # no deployment given: the trainer samples
    _check_outputs(tmp_path, cfg)


def test_quick_demo_against_a_remote_trainer_and_deployment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The Fireworks shape: a trainer URL, a deployment URL and id. The deployment is a
    # scriptable stand-in (toy completions), so this checks the path, not learning.
    from rollout.fake_deployment import KEY, fake_in_thread

    with LocalTrainer("null", api_key=KEY) as trainer, fake_in_thread() as fake:
        argv = ["demo", "--quick", "--no-progress", "--out", str(tmp_path)]
        argv += ["--base-url", trainer.base_url, "--api-key", KEY]
        argv += ["--deployment-url", fake.base_url, "--deployment-id", "dep"]
        assert main(argv) == 0
    summary = _check_outputs(tmp_path, DemoConfig().quick())
    assert summary["rollouts_from"] == f"deployment {fake.base_url}"
    loads = fake.hot_load_posts
    assert loads and "incremental_snapshot_metadata" not in loads[0]  # a base first
    for earlier, later in itertools.pairwise(loads):
        metadata = later.get("incremental_snapshot_metadata")
        if metadata is not None:  # a delta names the snapshot loaded just before it
            assert metadata["previous_snapshot_identity"] == earlier["identity"]
    assert len(fake.completions) > 0
    assert "rollouts sampled from the deployment" in capsys.readouterr().out


def test_deployment_options_come_in_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--out", str(tmp_path), "--base-url", "http://127.0.0.1:1"]
    assert main([*argv, "--deployment-url", "http://127.0.0.1:2"]) == 2
    assert "--deployment-id" in capsys.readouterr().err
    assert main(["demo", "--deployment-url", "http://x", "--deployment-id", "d"]) == 2
    assert "needs --base-url" in capsys.readouterr().err


def _learned(result: Any) -> bool:
    """The issue's bar: the last five RL steps' mean reward beats the first five's by
    0.3, or doubles it."""
    return bool(
        result.reward_last >= result.reward_first + 0.3
        or result.reward_last >= 2 * result.reward_first
    )


@pytest.mark.timeout(900)
def test_the_reward_rises_in_a_short_run_on_the_torch_engine(tmp_path: Path) -> None:
    """CI's check of the demo's headline claim: the full warm-up and 20 RL steps instead
    of 50. Seeded, so the outcome is fixed on a given machine; on this project's it
    clears the bar widely (mean reward 0.21 over the first five steps, 0.65 over the
    last five)."""
    cfg = DemoConfig(out_dir=tmp_path, progress=False, rl_steps=20)
    result = run_demo(cfg, out=io.StringIO())
    assert _learned(result), (result.reward_first, result.reward_last)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_full_demo_learns(tmp_path: Path) -> None:
    # The run is seeded, so this is a fixed outcome, not a flake.
    cfg = DemoConfig(out_dir=tmp_path, progress=False)
    result = run_demo(cfg, out=io.StringIO())
    _check_outputs(tmp_path, cfg)
    assert _learned(result)
    assert task.count_right(result.answers_after) > task.count_right(result.answers_before)


def test_api_key_without_base_url_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--api-key", "k", "--out", str(tmp_path)]) == 2
    assert "--base-url" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------- parts


def test_reward_is_exact_match() -> None:
    assert task.reward(7, "seven") == 1.0
    assert task.reward(7, "seven ") == 0.0
    assert task.reward(7, "six") == 0.0
    assert task.reward(0, "") == 0.0


def test_count_right() -> None:
    answers = {task.prompt_text(d): task.WORDS[d] for d in task.DIGITS}
    assert task.count_right(answers) == len(task.DIGITS)
    answers["3="] = "two"
    del answers["4="]
    assert task.count_right(answers) == len(task.DIGITS) - 2


def test_corpus_is_seeded_and_noisy() -> None:
    corpus = task.sft_corpus(2000, seed=3)
    assert corpus == task.sft_corpus(2000, seed=3)
    assert corpus != task.sft_corpus(2000, seed=4)
    right = sum(e.word == task.WORDS[e.digit] for e in corpus) / len(corpus)
    assert right == pytest.approx(task.CORPUS_ACCURACY, abs=0.05)
    assert all(e.word in task.WORDS for e in corpus)


def test_sft_datum_trains_on_the_answer_only() -> None:
    datum = task.BYTES.sft_datum(task.Example(3, "three"))
    tokens = task.BYTES.prompt_ids(3) + task.BYTES.completion_ids("three")
    assert datum.model_input.to_ints() == tokens[:-1]
    targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
    weights = datum.loss_fn_inputs["weights"].to_numpy()
    assert targets.tolist() == tokens[1:]
    # Weighted targets are exactly the answer's bytes and the EOS.
    assert targets[weights == 1.0].tolist() == task.BYTES.completion_ids("three")
    assert set(np.unique(weights).tolist()) == {0.0, 1.0}
    assert task.BYTES.completion_text(task.BYTES.completion_ids("three")) == "three"


def test_first_last_means() -> None:
    values = [0.0] * 5 + [0.5] * 10 + [1.0] * 5
    assert first_last_means(values) == (0.0, 1.0)
    assert first_last_means([0.2, 0.4]) == pytest.approx((0.3, 0.3))
    first, last = first_last_means([])
    assert math.isnan(first) and math.isnan(last)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="rl_steps"):
        DemoConfig(rl_steps=1)
    with pytest.raises(ValueError, match="substeps"):
        DemoConfig(substeps=len(task.DIGITS) + 1)


# ------------------------------------------------------------- a Hugging Face tokenizer


def _bpe_standin(directory: Path) -> None:
    """A tiny Llama stand-in with a BPE tokenizer trained on the task's text (offline),
    both saved with ``save_pretrained`` as a Hugging Face model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    inner = Tokenizer(models.BPE(unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    inner.train_from_iterator([f"{d}={w}" for d in task.DIGITS for w in task.WORDS], trainer)
    tokenizer = save_tokenizer(directory, inner)
    save_tiny_llama(
        directory,
        seed=0,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def test_vocabulary_speaks_a_hugging_face_tokenizer(tmp_path: Path) -> None:
    from firetitan.tokenizers import load_tokenizer

    _bpe_standin(tmp_path)
    vocab = task.Vocabulary(load_tokenizer(tmp_path))
    tokenizer = vocab.tokenizer
    prompt, answer = vocab.prompt_ids(7), vocab.completion_ids("seven")
    assert prompt[0] == tokenizer.bos_token_id and answer[-1] == tokenizer.eos_token_id
    assert max(prompt + answer) >= 256  # merged BPE tokens, not bytes
    assert vocab.completion_text(answer) == "seven"
    datum = vocab.sft_datum(task.Example(7, "seven"))
    weights = datum.loss_fn_inputs["weights"].to_numpy()
    assert datum.loss_fn_inputs["target_tokens"].to_numpy()[weights == 1.0].tolist() == answer


def test_vocabulary_refuses_a_tokenizer_without_eos() -> None:
    class NoEos:
        name = "no-eos"
        eos_token_id = None

    with pytest.raises(ValueError, match="'no-eos' has no end-of-sequence token"):
        task.Vocabulary(NoEos())


def test_quick_demo_on_a_stand_in_with_a_hugging_face_tokenizer(tmp_path: Path) -> None:
    """The demo reads the tokenizer the trainer reports (here the weights folder, as
    ``firetitan serve --weights DIR`` reports it) and speaks its ids."""
    weights = tmp_path / "standin"
    _bpe_standin(weights)
    with LocalTrainer("torch", weights=weights) as trainer:
        cfg = DemoConfig(
            out_dir=tmp_path / "out",
            progress=False,
            base_url=trainer.base_url,
            api_key=trainer.api_key,
        ).quick()
        run_demo(cfg, out=io.StringIO())
        trained = [r for r in trainer.execution_log if r.kind == "forward_backward"]
    _check_outputs(tmp_path / "out", cfg)
    assert trained  # it trained on the stand-in through the BPE ids
