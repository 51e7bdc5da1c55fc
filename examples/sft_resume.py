"""Supervised fine-tuning with the blocking client: checkpoints, a resume in another
job, and sampler exports.

Two jobs share one checkpoint root, as two runs of a training job on the same storage
would. Each local trainer has its own job id; a trainer keeps its checkpoints under
``<root>/<job id>/`` and reads another job's through ``cross_job://<job id>/<name>``.

* Job 1 trains on a short corpus with ``cross_entropy``, saves the training state
  (weights and optimizer) every few steps, and exports the weights for sampling
  (the first export ``base``, the next ``delta``: the difference to the previous one).
* Job 2 starts a fresh model, loads job 1's last state with
  ``load_state_with_optimizer`` (checked: the same loss as job 1 measured), trains on,
  exports, and samples a completion.

Run::

    python examples/sft_resume.py            # 40 + 20 steps
    python examples/sft_resume.py --quick    # 4 + 2 steps, what CI runs
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import tinker

from firetitan import (
    ByteTokenizer,
    FiretitanServiceClient,
    FiretitanTrainingClient,
    GradAccNormalization,
)
from firetitan.local import LocalTrainer

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
CORPUS = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "the bird sat on the wire.",
    "the fish swam in the lake.",
]
TOKENIZER = ByteTokenizer()
ADAM = tinker.AdamParams(learning_rate=3e-3, beta1=0.9, beta2=0.95)


def sft_datum(text: str) -> tinker.Datum:
    """Next-token prediction over the whole text, ending with end-of-sequence."""
    tokens = TOKENIZER.encode(text, add_bos=True, add_eos=True)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
            "weights": tinker.TensorData.from_numpy(np.ones(len(tokens) - 1, dtype=np.float32)),
        },
    )


DATA = [sft_datum(text) for text in CORPUS]
LOSS_TOKENS = sum(d.model_input.length for d in DATA)


def train(tc: FiretitanTrainingClient, steps: int, save_every: int, prefix: str) -> str:
    """Train ``steps`` steps; return the path of the last saved state."""
    path = ""
    for step in range(1, steps + 1):
        # Both calls are in flight together; the trainer runs them in call order.
        fb = tc.forward_backward(DATA, "cross_entropy")
        opt = tc.optim_step(ADAM, GradAccNormalization.NUM_LOSS_TOKENS)
        loss = fb.result().metrics["loss:sum"] / LOSS_TOKENS
        opt.result()
        if step % save_every == 0 or step == steps:
            path = tc.save_state(f"{prefix}-step-{step}").result().path
            print(f"{prefix} step {step}: loss {loss:.3f} nats/token, saved {path}")
    return path


def mean_loss(tc: FiretitanTrainingClient) -> float:
    return tc.forward(DATA, "cross_entropy").result().metrics["loss:sum"] / LOSS_TOKENS


def complete(service: FiretitanServiceClient, model_path: str, prompt: str) -> str:
    sampler = service.create_sampling_client(model_path=model_path)
    params = tinker.SamplingParams(max_tokens=24, temperature=0.0)
    prompt_ids = TOKENIZER.encode(prompt, add_bos=True)
    seq = sampler.sample(tinker.ModelInput.from_ints(prompt_ids), 1, params).result().sequences[0]
    # Sampled ids above 255 are specials (257 ends the sequence): decode skips them.
    return prompt + TOKENIZER.decode(seq.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, what CI runs")
    parser.add_argument("--checkpoint-dir", help="the shared checkpoint root (default: temporary)")
    args = parser.parse_args()
    steps, more, save_every = (4, 2, 2) if args.quick else (40, 20, 10)

    with tempfile.TemporaryDirectory() as scratch:
        root = args.checkpoint_dir or scratch
        with (
            LocalTrainer(checkpoint_dir=root, job_id="sft-job-1") as job1,
            FiretitanServiceClient(base_url=job1.base_url, api_key=job1.api_key) as service,
        ):
            tc = service.create_training_client(BASE_MODEL, lora_rank=0)
            first = tc.save_weights_for_sampler_ext("before", checkpoint_type="base")
            last_state = train(tc, steps, save_every, "sft")
            export = tc.save_weights_for_sampler_ext("after")  # a delta to "before"
            print(f"job 1 exported {first.snapshot_name} (base), {export.snapshot_name} (delta)")
            print(f"job 1 checkpoints: {tc.list_checkpoints()}")
            loss_at_save = mean_loss(tc)
        name = last_state.rsplit("/", 1)[-1]

        with (
            LocalTrainer(checkpoint_dir=root, job_id="sft-job-2") as job2,
            FiretitanServiceClient(base_url=job2.base_url, api_key=job2.api_key) as service,
        ):
            tc = service.create_training_client(BASE_MODEL, lora_rank=0)
            path = tc.resolve_checkpoint_path(name, source_job_id="sft-job-1")
            tc.load_state_with_optimizer(path).result()
            resumed = mean_loss(tc)
            print(f"job 2 resumed {path}: loss {resumed:.3f} (job 1 measured {loss_at_save:.3f})")
            if resumed != loss_at_save:
                raise SystemExit("the resumed model differs from the saved one")
            train(tc, more, save_every, "sft-resumed")
            final = tc.save_weights_for_sampler_ext("final", checkpoint_type="base")
            print(f"sample: {complete(service, final.path, 'the ')!r}")


if __name__ == "__main__":
    main()
