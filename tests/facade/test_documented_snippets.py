"""The documented blocking API (DESIGN.md §1, the Firetitan SDK docs), run as written
against the embedded trainer, with the null engine and with the torch engine."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tinker
import torch

from firetitan import FiretitanServiceClient, GradAccNormalization, SaveSamplerResult
from firetitan.local import LocalTrainer

from .conftest import BASE_MODEL, FAST, datum, wait_until


@pytest.fixture(params=["null", "torch"])
def two_jobs(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[LocalTrainer, LocalTrainer]]:
    """Two trainer jobs sharing one checkpoint root (for cross-job loading)."""
    engine = request.param
    with (
        LocalTrainer(engine, checkpoint_dir=tmp_path, job_id="job-a", **FAST) as first,
        LocalTrainer(engine, checkpoint_dir=tmp_path, job_id="job-b", **FAST) as second,
    ):
        yield first, second


def test_the_documented_training_flow(two_jobs: tuple[LocalTrainer, LocalTrainer]) -> None:
    trainer, other_job = two_jobs
    url, key = trainer.base_url, trainer.api_key
    datums = [datum(), datum(offset=20)]

    service = FiretitanServiceClient(base_url=url, api_key=key)
    tc = service.create_training_client(
        base_model="accounts/fireworks/models/qwen3-8b", lora_rank=0, user_metadata={"run": "demo"}
    )
    with pytest.raises(ValueError, match="already exists"):
        service.create_training_client(base_model="accounts/fireworks/models/qwen3-8b", lora_rank=0)

    out = tc.forward(datums, "cross_entropy").result()  # future
    logprobs = out.loss_fn_outputs[0]["logprobs"].data
    assert len(logprobs) == 7 and all(isinstance(x, float) for x in logprobs)

    def my_loss(data: list[tinker.Datum], logprobs_list: list[torch.Tensor]) -> Any:
        loss = -sum(lp.sum() for lp in logprobs_list) / len(logprobs_list)
        return loss, {"loss": float(loss.item())}

    fb = tc.forward_backward_custom(datums, my_loss)  # future
    opt = tc.optim_step(
        tinker.AdamParams(learning_rate=1e-5),
        grad_accumulation_normalization=GradAccNormalization.NUM_LOSS_TOKENS,
    )
    result = fb.result()
    opt.result()  # pipelined: both were in flight
    expected = -sum(sum(o["logprobs"].data) for o in out.loss_fn_outputs) / len(datums)
    assert result.metrics["loss"] == pytest.approx(expected, rel=1e-5)

    adam = tinker.AdamParams(
        learning_rate=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01
    )
    tc.forward_backward(datums, "cross_entropy").result()
    assert tc.optim_step(adam).result() is not None
    for normalization in GradAccNormalization:
        tc.forward_backward(datums, "cross_entropy").result()
        step = tc.optim_step(adam, grad_accumulation_normalization=normalization).result()
        assert step is not None

    res = tc.save_weights_for_sampler_ext("step-100", checkpoint_type="base")  # a value
    assert isinstance(res, SaveSamplerResult)
    assert re.fullmatch(r"step-100-[0-9a-f]{8}", res.snapshot_name)

    tc.save_state("train_state_step_100").result()
    tc.load_state_with_optimizer("train_state_step_100").result()
    tc.save_state("step-2").result()
    tc.save_state("step-4").result()
    assert tc.list_checkpoints() == ["step-2", "step-4", "train_state_step_100"]

    tc.save_state("short-lived", ttl_seconds=1).result()
    assert "short-lived" in tc.list_checkpoints()
    wait_until(lambda: "short-lived" not in tc.list_checkpoints(), what="the TTL to expire")

    sampler = tc.save_weights_and_get_sampling_client()  # for rollouts
    sample = sampler.sample(
        tinker.ModelInput.from_ints([1, 2, 3]), 1, tinker.SamplingParams(max_tokens=3)
    ).result()
    assert len(sample.sequences) == 1
    service.close()
    assert service.closed

    # A second trainer job sharing the checkpoint root resumes from the first job's step-4.
    with FiretitanServiceClient(base_url=other_job.base_url, api_key=other_job.api_key) as service:
        tc = service.create_training_client(base_model=BASE_MODEL, lora_rank=0)
        path = tc.resolve_checkpoint_path("step-4", source_job_id=trainer.job_id)
        assert path == "cross_job://job-a/step-4"
        tc.load_state_with_optimizer(path).result()
        tc.forward_backward(datums, "cross_entropy").result()
        assert tc.list_checkpoints() == []  # job-b's own list
    assert service.closed
