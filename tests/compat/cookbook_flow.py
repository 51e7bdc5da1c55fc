"""Runs tinker-cookbook 0.6.1's own training loops, unchanged, against a trainer; run as a
child process by ``test_cookbook.py`` (``sdk_child`` says why and how).

The only thing configured the way a user without a model hub would: the cookbook's
tokenizer lookup for the base model answers a byte tokenizer with the trainer's ids
(bytes 0-255, BOS 256, EOS 257). The loops then talk to the trainer through the tinker
SDK with its default client configuration.

Input on stdin, as JSON: ``{"mode": ..., "base_model": ..., "log_path": ..., ...}``.
Modes: ``sft`` (the supervised loop, ``steps`` steps, saving every ``save_every``),
``rl`` (the RL loop, once per entry of ``runs``: ``async`` for its asynchronous mode,
``loss_fn`` for its loss, ``crash_at`` to stop it at that batch),
``download`` (``weights.download`` of ``tinker_path`` into ``out``) and ``rest`` (the
tinker ``RestClient``: list the run's checkpoints, delete one, list again).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import chz
import tinker
from tinker_cookbook import checkpoint_utils, tokenizer_utils, weights
from tinker_cookbook.rl import train as rl_train
from tinker_cookbook.rl.types import (
    Env,
    EnvGroupBuilder,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
)
from tinker_cookbook.supervised import train as sft_train
from tinker_cookbook.supervised.types import SupervisedDataset, SupervisedDatasetBuilder

from tests.compat.sdk_child import SdkProblems, report, trainer_address

BOS, EOS = 256, 257


class ByteTokenizer:
    """What the cookbook asks of a tokenizer, over the trainer's byte vocabulary."""

    bos_token_id = BOS
    eos_token_id = EOS
    bos_token = "<bos>"
    eos_token = "<eos>"

    def encode(self, text: str, add_special_tokens: bool = False, **_: Any) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


# --------------------------------------------------------------------------- SFT

SFT_PAIRS = [("Q: cat\nA:", " meow"), ("Q: dog\nA:", " woof"), ("Q: cow\nA:", " moo")]


def _sft_datum(prompt: str, completion: str) -> tinker.Datum:
    head = [BOS, *prompt.encode()]
    tokens = [*head, *completion.encode(), EOS]
    weights_ = [0.0] * len(head) + [1.0] * (len(tokens) - len(head))
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64"),
            "weights": tinker.TensorData(data=weights_[1:], dtype="float32"),
        },
    )


class Interrupted(Exception):
    """Stands for a run killed part way (``crash_at``), to resume from its checkpoints."""


class PairsDataset(SupervisedDataset):
    def __init__(self, batches: int, crash_at: int | None) -> None:
        self._batches = batches
        self._crash_at = crash_at

    def get_batch(self, index: int) -> list[tinker.Datum]:
        if index == self._crash_at:
            raise Interrupted(f"batch {index}")
        return [_sft_datum(*pair) for pair in SFT_PAIRS]

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, seed: int = 0) -> None:
        pass


@chz.chz
class PairsBuilder(SupervisedDatasetBuilder):
    batches: int = 4
    crash_at: int | None = None

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        return PairsDataset(self.batches, self.crash_at), None


def run_sft(spec: dict[str, Any], base_url: str) -> dict[str, Any]:
    config = sft_train.Config(
        log_path=spec["log_path"],
        model_name=spec["base_model"],
        recipe_name="firetitan_test_sft",
        renderer_name="role_colon",  # recorded as run metadata, checked again on resume
        dataset_builder=PairsBuilder(batches=spec["steps"], crash_at=spec.get("crash_at")),
        learning_rate=1e-3,
        lora_rank=4,
        save_every=spec.get("save_every", 2),
        eval_every=0,
        max_steps=spec.get("max_steps"),
        base_url=base_url,
    )
    try:
        asyncio.run(sft_train.main(config))
    except Interrupted:
        return {"interrupted": True}
    return {"interrupted": False}


# --------------------------------------------------------------------------- RL


class SpellEnv(Env):
    """One prompt; reward 1 when the answer starts with the wanted letter."""

    def __init__(self, prompt: str, wanted: str) -> None:
        self._prompt = prompt
        self._wanted = wanted

    @property
    def stop_condition(self) -> list[int]:
        return [EOS]

    async def initial_observation(self) -> tuple[tinker.ModelInput, list[int]]:
        return tinker.ModelInput.from_ints([BOS, *self._prompt.encode()]), self.stop_condition

    async def step(self, action: list[int], *, extra: Any = None) -> StepResult:
        text = ByteTokenizer().decode(action)
        return StepResult(
            reward=1.0 if text.startswith(self._wanted) else 0.0,
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=self.stop_condition,
        )


class SpellGroup(EnvGroupBuilder):
    def __init__(self, prompt: str, wanted: str, size: int) -> None:
        self.prompt, self.wanted, self.size = prompt, wanted, size

    async def make_envs(self) -> Sequence[Env]:
        return [SpellEnv(self.prompt, self.wanted) for _ in range(self.size)]


class SpellDataset(RLDataset):
    def __init__(self, batches: int, groups: int, group_size: int, crash_at: int | None) -> None:
        self._batches, self._groups, self._group_size = batches, groups, group_size
        self._crash_at = crash_at

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        if index == self._crash_at:
            raise Interrupted(f"batch {index}")
        letters = "abcdefgh"
        return [
            SpellGroup(f"{letters[(index + g) % 8]}=", letters[(index + g) % 8], self._group_size)
            for g in range(self._groups)
        ]

    def __len__(self) -> int:
        return self._batches


@chz.chz
class SpellBuilder(RLDatasetBuilder):
    batches: int = 3
    groups: int = 2
    group_size: int = 4
    crash_at: int | None = None

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        return SpellDataset(self.batches, self.groups, self.group_size, self.crash_at), None


def run_rl(spec: dict[str, Any], base_url: str) -> dict[str, Any]:
    """One RL run per entry of ``spec["runs"]`` (``log_path``, ``async``, ``loss_fn``,
    ``crash_at``), one after another in this process; says which were interrupted."""
    interrupted = []
    for run in spec["runs"]:
        options: dict[str, Any] = {}
        if run.get("async"):
            async_options: dict[str, Any] = {"max_steps_off_policy": 1, "groups_per_batch": 2}
            if run.get("loss_fn"):
                async_options["loss_fn"] = run["loss_fn"]
            options["async_config"] = rl_train.AsyncConfig(**async_options)
        elif run.get("loss_fn"):
            options["loss_fn"] = run["loss_fn"]
        config = rl_train.Config(
            learning_rate=1e-3,
            dataset_builder=SpellBuilder(batches=spec["steps"], crash_at=run.get("crash_at")),
            model_name=spec["base_model"],
            recipe_name="firetitan_test_rl",
            max_tokens=6,
            log_path=run["log_path"],
            eval_every=0,
            save_every=2,
            lora_rank=4,
            base_url=base_url,
            num_groups_to_log=0,
            **options,
        )
        try:
            asyncio.run(rl_train.main(config))
        except Interrupted:
            interrupted.append(run["log_path"])
    return {"interrupted": interrupted}


# --------------------------------------------------------------------------- REST


def run_download(spec: dict[str, Any], base_url: str) -> dict[str, Any]:
    out = weights.download(
        tinker_path=spec["tinker_path"], output_dir=spec["out"], base_url=base_url
    )
    return {"files": sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file())}


def run_rest(spec: dict[str, Any], base_url: str) -> dict[str, Any]:
    rest = tinker.RestClient(base_url=base_url)
    path = spec["tinker_path"]
    run = rest.get_training_run_by_tinker_path(path).result()
    before = rest.list_checkpoints(run.training_run_id).result()
    rest.delete_checkpoint_from_tinker_path(path).result()
    after = rest.list_checkpoints(run.training_run_id).result()
    return {
        "run": run.model_dump(mode="json"),
        "before": [c.tinker_path for c in before.checkpoints],
        "after": [c.tinker_path for c in after.checkpoints],
        "renderer": checkpoint_utils.get_renderer_name_from_checkpoint(
            tinker.ServiceClient(base_url=base_url), path
        ),
    }


MODES = {"sft": run_sft, "rl": run_rl, "download": run_download, "rest": run_rest}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    base_url, api_key = trainer_address()
    os.environ["TINKER_API_KEY"] = api_key
    tokenizer_utils.register_tokenizer(spec["base_model"], ByteTokenizer)
    # The cookbook's renderer check on resume uses a tinker call that tinker deprecates;
    # the child runs with warnings as errors otherwise.
    warnings.filterwarnings("ignore", "DEPRECATED: ServiceClient.create_rest_client")
    problems = SdkProblems("tinker").install()
    summary = MODES[spec["mode"]](spec, base_url)
    report({**summary, "problems": problems.problems})


if __name__ == "__main__":
    main()
