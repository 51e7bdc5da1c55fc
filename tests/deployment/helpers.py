"""Writing sampler snapshots the way the trainer does, and talking to a deployment."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import tinker
import torch
from shared import BASE_MODEL

from firetitan.local.checkpoints import CheckpointStore
from firetitan.local.deployment.server import COMPLETIONS_PATH, HOT_LOAD_PATH, DeploymentServer
from firetitan.local.deployment.snapshots import SnapshotLoader
from firetitan.local.engine import ModelSpec
from firetitan.local.torch import ByteTokenizer, TorchEngine

KEY = "tml-deployment-test-key"
TOK = ByteTokenizer()
ADAM = tinker.AdamParams(learning_rate=1e-2)


class Snapshots:
    """A tiny full-parameter model whose sampler exports land where ``firetitan serve``
    puts them (``<root>/job-1/sampler/<name>``)."""

    def __init__(self, root: Path, *, lora_rank: int = 0) -> None:
        self.root = root
        self.store = CheckpointStore(root, "job-1")
        self.engine = TorchEngine(size="tiny", device="cpu", seed=0)
        self.model_id = "m"
        spec = ModelSpec(base_model=BASE_MODEL, lora_rank=lora_rank)
        self.engine.create_model(self.model_id, spec)
        self.last: Path | None = None

    def train(self, text: str = "the deployment learns this") -> None:
        ids = TOK.encode(text, add_bos=True, add_eos=True)
        datum = tinker.Datum(
            model_input=tinker.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": np.asarray(ids[1:], dtype=np.int64)},
        )
        self.engine.forward_backward(self.model_id, [datum], "cross_entropy", None)
        self.engine.optim_step(self.model_id, ADAM, None)

    def save(self, name: str, kind: str = "base") -> Path:
        """Export the current weights as ``name`` (a delta diffs against the last one)."""
        previous = self.last if kind == "delta" else None
        with self.store.write(
            "sampler", name, model_id=self.model_id, metadata={"checkpoint_type": kind}
        ) as directory:
            self.engine.save_for_sampler(self.model_id, directory, kind, previous)
        self.last, _ = self.store.resolve("sampler", name)
        return self.last

    def logprobs(self, tokens: list[int]) -> list[float]:
        """The trainer's own ``forward`` log-probabilities of ``tokens[1:]``."""
        datum = tinker.Datum(
            model_input=tinker.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], dtype=np.int64)},
        )
        out = self.engine.forward(self.model_id, [datum], "cross_entropy", None)
        return [float(v) for v in out.loss_fn_outputs[0]["logprobs"].to_torch().tolist()]


class Deployment:
    """A running `DeploymentServer` and a raw HTTP client for it."""

    def __init__(self, server: DeploymentServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.url = server.base_url
        self.model = server.model
        self.headers = {
            "Authorization": f"Bearer {KEY}",
            "fireworks-deployment": server.model,
            "fireworks-model": BASE_MODEL,
        }

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, root: Path, **options: Any) -> AsyncIterator[Deployment]:
        loader = await asyncio.to_thread(
            SnapshotLoader, root, BASE_MODEL, size="tiny", device=torch.device("cpu")
        )
        server = DeploymentServer(loader, KEY, account="acct", deployment_id="dep", **options)
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                yield cls(server, http)
        finally:
            await server.close()

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        async with self.http.request(
            method, self.url + path, json=body, headers=self.headers if headers is None else headers
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    async def hot_load(self, identity: str, previous: str | None = None) -> dict[str, Any]:
        """POST a hot-load and poll until it is done or failed; the final replica state."""
        body: dict[str, Any] = {"identity": identity, "reset_prompt_cache": True}
        if previous is not None:
            body["incremental_snapshot_metadata"] = {
                "previous_snapshot_identity": previous,
                "compression_format": "arc_v2",
                "checksum_format": "alder32",
            }
        status, answer = await self.request("POST", HOT_LOAD_PATH, body)
        assert status == 200, answer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            status, state = await self.request("GET", HOT_LOAD_PATH)
            assert status == 200, state
            replica: dict[str, Any] = state["replicas"][0]
            loading = replica.get("loading_state", {})
            if loading.get("target_snapshot_identity") == identity and loading.get("stage") in (
                "done",
                "error",
            ):
                return replica
            assert loop.time() < deadline, replica
            await asyncio.sleep(0.02)

    async def complete(self, prompt: list[int], **fields: Any) -> dict[str, Any]:
        """A non-streaming completion."""
        body = {"model": self.model, "prompt": prompt, **fields}
        status, answer = await self.request("POST", COMPLETIONS_PATH, body)
        assert status == 200, answer
        result: dict[str, Any] = answer
        return result

    async def stream(self, prompt: list[int], **fields: Any) -> list[dict[str, Any]]:
        """A streaming completion: its data chunks, up to ``[DONE]``."""
        body = {"model": self.model, "prompt": prompt, "stream": True, **fields}
        chunks: list[dict[str, Any]] = []
        async with self.http.post(
            self.url + COMPLETIONS_PATH, json=body, headers=self.headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = await resp.text()
        events = [e for e in text.split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]", events[-1]
        for event in events[:-1]:
            assert event.startswith("data: "), event
            chunks.append(json.loads(event[len("data: ") :]))
        return chunks


def generated(answer: dict[str, Any], index: int = 0) -> list[int]:
    """The generated ids of a non-streaming answer's choice."""
    ids: list[int] = answer["choices"][index]["raw_output"]["completion_token_ids"]
    return ids


def token_logprobs(answer: dict[str, Any], index: int = 0) -> list[float]:
    return [row["logprob"] for row in answer["choices"][index]["logprobs"]["content"]]
