"""The rollout half with the public Fireworks training SDK, unchanged: a trainer
(``firetitan serve``) and a deployment (``firetitan deploy``) over one checkpoint
folder. Run as a child process by ``test_fireworks_rollout.py`` (``sdk_child`` says why).

After every hot-load, the tokens the deployment samples carry the same log-probabilities
as the trainer's own ``forward`` of those tokens: the base/delta chain was applied
exactly. Output: what the parent test checks, with every WARNING-or-worse SDK record.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from pathlib import Path
from typing import Any

from fireworks.training.sdk import FiretitanServiceClient
from fireworks.training.sdk import types as fw
from fireworks.training.sdk.deployment import DeploymentManager, DeploymentSampler
from fireworks.training.sdk.weight_syncer import WeightSyncer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from shared import BASE_MODEL, next_token_datum

from tests.compat.sdk_child import SdkProblems, report, trainer_address

DEPLOYMENT_URL = "FIRETITAN_TEST_DEPLOYMENT_URL"
CHECKPOINT_DIR = "FIRETITAN_TEST_CHECKPOINT_DIR"
DEPLOYMENT_ID = "local-deployment"
PROMPT = [104, 101, 108, 108, 111, 32]  # "hello "


def sft_datum(tokens: list[int]) -> fw.Datum:
    return next_token_datum(fw, tokens)


def forward_logprobs(client: Any, tokens: list[int]) -> list[float]:
    """The trainer's log-probabilities of ``tokens[1:]``."""
    out = client.forward([sft_datum(tokens)], "cross_entropy").result()
    return [float(v) for v in out.loss_fn_outputs[0]["logprobs"].data]


def worst_gap(sampled: list[float], expected: list[float]) -> float:
    assert len(sampled) == len(expected), (len(sampled), len(expected))
    return max(abs(a - b) for a, b in zip(sampled, expected, strict=True))


def train_step(client: Any, text: str) -> None:
    client.forward_backward([sft_datum(list(text.encode()))], "cross_entropy").result()
    client.optim_step(fw.AdamParams(learning_rate=1e-2)).result()


def corrupt(checkpoint_dir: Path, snapshot: str) -> None:
    """Swap two equally sized tensors' diffs in a delta export: valid zstd, wrong bytes."""
    (diff_file,) = checkpoint_dir.glob(f"*/sampler/{snapshot}/delta.safetensors")
    with safe_open(str(diff_file), framework="pt") as f:
        checksums = f.metadata()
    diffs = load_file(str(diff_file))
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    diffs[a], diffs[b] = diffs[b], diffs[a]
    save_file(diffs, str(diff_file), metadata=checksums)


def replica_state(manager: DeploymentManager) -> dict[str, Any]:
    status = manager.hotload_check_status(DEPLOYMENT_ID, BASE_MODEL)
    state: dict[str, Any] = status["replicas"][0]["loading_state"]
    return state


def main() -> None:
    problems = SdkProblems("fireworks").install()
    trainer_url, api_key = trainer_address()
    deployment_url = os.environ[DEPLOYMENT_URL]
    out: dict[str, Any] = {"gaps": [], "snapshots": []}
    service = FiretitanServiceClient(base_url=trainer_url, api_key=api_key)
    client = service.create_training_client(BASE_MODEL, lora_rank=0)
    manager = DeploymentManager(api_key=api_key, base_url=deployment_url)
    out["account"] = manager.account_id
    syncer = WeightSyncer(
        policy_client=client, deploy_mgr=manager, deployment_id=DEPLOYMENT_ID,
        base_model=BASE_MODEL,
    )  # fmt: skip
    sampler: DeploymentSampler = syncer.get_deployment_sampler()

    for step in range(3):  # base, delta, delta
        if step:
            train_step(client, f"step {step}: the weights move")
        snapshot = syncer.save_and_hotload(f"rollout-{step}")
        out["snapshots"].append(snapshot)
        completions = asyncio.run(
            sampler.sample_with_prompt_tokens(
                PROMPT, n=3, max_tokens=8, temperature=1.0, logprobs=True
            )
        )
        for c in completions:
            tokens = c.full_tokens[c.prompt_len :]
            expected = forward_logprobs(client, PROMPT + tokens)[len(PROMPT) - 1 :]
            assert c.inference_logprobs is not None and c.sampling_logprobs is not None
            out["gaps"].append(worst_gap(c.inference_logprobs, expected))
            out["gaps"].append(worst_gap([float(v) for v in c.sampling_logprobs], expected))

    # The Tinker-shaped client over the same deployment.
    sampling = syncer.get_sampling_client()
    response = sampling.sample(
        fw.ModelInput.from_ints(PROMPT), 2, fw.SamplingParams(max_tokens=6, temperature=1.0)
    ).result()
    for seq in response.sequences:
        expected = forward_logprobs(client, PROMPT + list(seq.tokens))[len(PROMPT) - 1 :]
        out["gaps"].append(worst_gap(list(seq.logprobs), expected))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "use training_client.forward()"
        prompt_lps = sampling.compute_logprobs(fw.ModelInput.from_ints(PROMPT)).result()
    out["compute_logprobs_first"] = prompt_lps[0]
    prompt_gap = worst_gap([float(v) for v in prompt_lps[1:]], forward_logprobs(client, PROMPT))
    out["gaps"].append(prompt_gap)

    # DeploymentManager directly: a re-sent hot-load of the served snapshot succeeds...
    last = out["snapshots"][-1]
    out["reload"] = manager.hotload_and_wait(DEPLOYMENT_ID, BASE_MODEL, last, timeout_seconds=60)
    # ...an identity never saved fails at once with the deployment's reason...
    out["unknown"] = manager.hotload_and_wait(
        DEPLOYMENT_ID, BASE_MODEL, "never-saved-snapshot", timeout_seconds=60
    )
    out["unknown_message"] = manager.last_hotload_error_message
    out["unknown_state"] = replica_state(manager)
    # ...and so does a corrupted delta.
    train_step(client, "one more step")
    bad = client.save_weights_for_sampler_ext("corrupted", checkpoint_type="delta").snapshot_name
    corrupt(Path(os.environ[CHECKPOINT_DIR]), bad)
    metadata = {
        "previous_snapshot_identity": last, "compression_format": "arc_v2",
        "checksum_format": "alder32",
    }  # fmt: skip
    out["corrupted"] = manager.hotload_and_wait(
        DEPLOYMENT_ID, BASE_MODEL, bad, incremental_snapshot_metadata=metadata,
        timeout_seconds=60,
    )  # fmt: skip
    out["corrupted_message"] = manager.last_hotload_error_message
    out["corrupted_state"] = replica_state(manager)
    out["still_serving"] = manager.hotload_and_wait(
        DEPLOYMENT_ID, BASE_MODEL, last, timeout_seconds=60
    )
    service.close()
    # The SDK logs each refused hot-load as an error; anything else is a problem.
    out["problems"] = [p for p in problems.problems if "never-saved" not in p and bad not in p]
    report(out)


if __name__ == "__main__":
    main()
