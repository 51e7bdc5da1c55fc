"""Raw-protocol helpers for the local trainer's tests: bodies built by hand as the
reference client sends them (v1 JSON), and a thin aiohttp client that checks that every
answer is JSON."""

from __future__ import annotations

from typing import Any

import aiohttp
from shared import BASE_MODEL

from firetitan.local import LocalTrainer


def text_datum(
    tokens: list[int], targets: list[int] | None = None, weights: list[float] | None = None
) -> dict[str, Any]:
    """A datum as the reference client sends it (v1 JSON)."""
    targets = tokens if targets is None else targets
    inputs: dict[str, Any] = {
        "target_tokens": {"data": targets, "dtype": "int64", "shape": [len(targets)]}
    }
    if weights is not None:
        inputs["weights"] = {"data": weights, "dtype": "float32", "shape": [len(weights)]}
    return {
        "loss_fn_inputs": inputs,
        "model_input": {"chunks": [{"tokens": tokens, "type": "encoded_text"}]},
    }


def forward_body(
    model_id: str,
    seq_id: int,
    data: list[dict[str, Any]] | None = None,
    *,
    backward: bool = False,
    loss_fn: str = "cross_entropy",
) -> dict[str, Any]:
    key = "forward_backward_input" if backward else "forward_input"
    return {
        key: {"data": data or [text_datum([1, 2, 3])], "loss_fn": loss_fn},
        "model_id": model_id,
        "seq_id": seq_id,
    }


def optim_body(model_id: str, seq_id: int) -> dict[str, Any]:
    return {
        "adam_params": {
            "learning_rate": 1e-4,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-12,
            "weight_decay": 0.0,
            "grad_clip_norm": 0.0,
        },
        "model_id": model_id,
        "seq_id": seq_id,
        "type": "optim_step",
    }


class Api:
    """A raw protocol client: every request is built and checked by the test."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, key: str) -> None:
        self.http = session
        self.base_url = base_url
        self.key = key

    def url(self, endpoint: str) -> str:
        return f"{self.base_url}/api/v1/{endpoint}"

    async def post(
        self,
        endpoint: str,
        body: Any = None,
        *,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        all_headers = {"X-API-Key": self.key, **(headers or {})}
        kwargs: dict[str, Any] = {"json": body} if data is None else {"data": data}
        async with self.http.post(self.url(endpoint), headers=all_headers, **kwargs) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json()

    async def get(self, endpoint: str) -> tuple[int, Any]:
        async with self.http.get(self.url(endpoint), headers={"X-API-Key": self.key}) as resp:
            assert resp.content_type == "application/json"
            return resp.status, await resp.json()

    async def submit(self, endpoint: str, body: Any, **headers: str) -> str:
        status, answer = await self.post(endpoint, body, headers=headers or None)
        assert status == 200, answer
        request_id = answer["request_id"]
        assert isinstance(request_id, str)
        return request_id

    async def poll(self, request_id: str) -> dict[str, Any]:
        status, answer = await self.post(
            "retrieve_future", {"request_id": request_id, "allow_metadata_only": True}
        )
        assert status == 200, answer
        assert isinstance(answer, dict)
        return answer

    async def outcome(self, request_id: str, max_polls: int = 20) -> dict[str, Any]:
        """Poll until the request is no longer pending."""
        for _ in range(max_polls):
            answer = await self.poll(request_id)
            if answer.get("type") != "try_again":
                return answer
        raise AssertionError(f"{request_id} still pending after {max_polls} polls")

    async def result(self, request_id: str) -> dict[str, Any]:
        answer = await self.outcome(request_id)
        assert "error" not in answer, answer
        return answer

    async def session(self) -> str:
        status, answer = await self.post(
            "create_session",
            {"tags": [], "user_metadata": {}, "sdk_version": "0.23.0", "type": "create_session"},
        )
        assert status == 200, answer
        session_id = answer["session_id"]
        assert isinstance(session_id, str)
        return session_id

    async def model(
        self, session_id: str | None = None, model_seq_id: int = 0, lora_rank: int = 0
    ) -> str:
        session_id = session_id or await self.session()
        request_id = await self.submit(
            "create_model",
            {
                "session_id": session_id,
                "model_seq_id": model_seq_id,
                "base_model": BASE_MODEL,
                "lora_config": {
                    "rank": lora_rank,
                    "train_unembed": True,
                    "train_mlp": True,
                    "train_attn": True,
                },
                "type": "create_model",
            },
        )
        result = await self.result(request_id)
        assert result["type"] == "create_model"
        assert result["comms"] == "v2"
        model_id = result["model_id"]
        assert model_id == f"{session_id}:train:{model_seq_id}"
        return str(model_id)


def executed(trainer: LocalTrainer, model_id: str) -> list[tuple[int | None, str]]:
    """``(seq_id, kind)`` of a model's executed requests, in execution order."""
    return [(r.seq_id, r.kind) for r in trainer.execution_log if r.model_id == model_id]
