"""Two policies trained at once, each on its own trainer, from one process.

A local trainer runs one request at a time: two models on one trainer take turns. To
train two policies in parallel, give each its own trainer (here two embedded
``LocalTrainer``s; two ``firetitan serve`` processes or two remote jobs work the
same way, through their ``base_url``). One process drives both: every step submits
``forward_backward`` + ``optim_step`` to both trainers before reading any result, so
the trainers work at the same time.

The two policies differ only in their learning rate, and both are compared on the same
held-out text at the end.

Run::

    python examples/two_trainers.py            # 30 steps
    python examples/two_trainers.py --quick    # 3 steps, what CI runs
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import tinker

from firetitan import APIFuture, ByteTokenizer, FiretitanServiceClient, GradAccNormalization
from firetitan.local import LocalTrainer

BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
TRAIN = ["one two three four five.", "two three four five six.", "three four five six seven."]
HELD_OUT = ["four five six seven eight."]
LEARNING_RATES = {"slow": 1e-3, "fast": 1e-2}
TOKENIZER = ByteTokenizer()


def datums(texts: list[str]) -> list[tinker.Datum]:
    out = []
    for text in texts:
        tokens = TOKENIZER.encode(text, add_bos=True, add_eos=True)
        out.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tinker.TensorData.from_numpy(np.array(tokens[1:])),
                    "weights": tinker.TensorData.from_numpy(np.ones(len(tokens) - 1, np.float32)),
                },
            )
        )
    return out


def per_token(future: APIFuture[tinker.ForwardBackwardOutput], data: list[tinker.Datum]) -> float:
    return future.result().metrics["loss:sum"] / sum(d.model_input.length for d in data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, what CI runs")
    args = parser.parse_args()
    steps = 3 if args.quick else 30
    train, held_out = datums(TRAIN), datums(HELD_OUT)

    with contextlib.ExitStack() as stack:
        policies = {}
        for name in LEARNING_RATES:
            # One trainer per policy. The same seed gives both the same stand-in weights.
            trainer = stack.enter_context(LocalTrainer(job_id=f"policy-{name}", seed=0))
            service = stack.enter_context(
                FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key)
            )
            policies[name] = service.create_training_client(BASE_MODEL, lora_rank=0)

        start = time.perf_counter()
        for step in range(1, steps + 1):
            pending = {}
            for name, tc in policies.items():  # submit to both trainers first...
                adam = tinker.AdamParams(learning_rate=LEARNING_RATES[name])
                fb = tc.forward_backward(train, "cross_entropy")
                opt = tc.optim_step(adam, GradAccNormalization.NUM_LOSS_TOKENS)
                pending[name] = (fb, opt)
            losses = {}
            for name, (fb, opt) in pending.items():  # ...then read
                losses[name] = per_token(fb, train)
                opt.result()
            print(f"step {step}: " + ", ".join(f"{n} {loss:.3f}" for n, loss in losses.items()))
        print(f"{steps} steps of both policies in {time.perf_counter() - start:.1f} s")

        evals = {name: tc.forward(held_out, "cross_entropy") for name, tc in policies.items()}
        for name, future in evals.items():
            print(
                f"held-out loss of {name} (lr {LEARNING_RATES[name]:g}): "
                f"{per_token(future, held_out):.3f} nats/token"
            )


if __name__ == "__main__":
    main()
