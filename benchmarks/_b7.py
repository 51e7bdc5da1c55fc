"""B7: sampling throughput of the local deployment (continuous batching).

Three ways to generate the same work, 64 requests × 64 new tokens from 16-token
prompts on the ``tiny`` stand-in (CPU, one torch thread everywhere), interleaved per
round:

* ``concurrent``: all 64 as concurrent streaming completions against ``firetitan
  deploy`` (a separate process), as an RL rollout sends them; they share decode steps;
* ``one at a time``: the same 64 requests, each waiting for the previous one;
* ``HF generate``: one in-process ``model.generate`` call on the same (64, 16) batch
  with the same sampling settings (no server, no HTTP, no log-probabilities).

Goals: concurrent ≥ 8× faster than one at a time (wall ratio ≤ 0.125), and ≥ 0.7× the
tokens/s of HF ``generate`` (wall ratio ≤ 1/0.7).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks._report import Report, Target, fmt, fmt_ratio, median, ratio

__all__ = ["measure_b7"]

REQUESTS = 64
NEW_TOKENS = 64
PROMPT_TOKENS = 16
BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
PATHS = ("concurrent", "one at a time", "HF generate")


def _prompt(i: int) -> list[int]:
    return [(7 * i + 13 * j) % 250 + 1 for j in range(PROMPT_TOKENS)]


@contextlib.contextmanager
def _one_thread_child() -> Iterator[None]:
    """Children started inside inherit one OpenMP thread (as B6's trainer does)."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


async def _one(http: aiohttp.ClientSession, url: str, model: str, key: str, i: int) -> int:
    body = {
        "model": model, "prompt": _prompt(i), "n": 1, "max_tokens": NEW_TOKENS,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "stream": True, "raw_output": True,
        "logprobs": True, "perf_metrics_in_response": True, "stop": [],
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {key}", "X-Api-Key": key}
    async with http.post(f"{url}/inference/v1/completions", json=body, headers=headers) as r:
        text = await r.text()
        if r.status != 200:
            raise RuntimeError(f"completions answered {r.status}: {text[:300]}")
    last = [e for e in text.split("\n\n") if e.startswith("data: {")][-1]
    ids = json.loads(last[len("data: ") :])["choices"][0]["raw_output"]["completion_token_ids"]
    return len(ids)


async def _deployment_run(url: str, model: str, key: str, concurrent: bool) -> float:
    connector = aiohttp.TCPConnector(limit=REQUESTS)
    async with aiohttp.ClientSession(connector=connector) as http:
        await _one(http, url, model, key, 0)  # a warm connection
        start = time.perf_counter()
        if concurrent:
            counts = await asyncio.gather(
                *(_one(http, url, model, key, i) for i in range(REQUESTS))
            )
        else:
            counts = [await _one(http, url, model, key, i) for i in range(REQUESTS)]
        wall = time.perf_counter() - start
    if counts != [NEW_TOKENS] * REQUESTS:
        raise RuntimeError(f"expected {NEW_TOKENS} tokens per request, got {set(counts)}")
    return wall


def _hf_generate() -> Callable[[], float]:
    """A timed ``generate`` of the whole batch on the same stand-in, in this process."""
    import torch

    from firetitan.local.torch.models import build_standin

    torch.set_num_threads(1)
    module = build_standin(BASE_MODEL, "tiny", 0)
    ids = torch.tensor([_prompt(i) for i in range(REQUESTS)], dtype=torch.int64)

    def run() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = module.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, temperature=1.0,
                top_k=0, top_p=1.0, pad_token_id=0,
            )  # fmt: skip
        wall = time.perf_counter() - start
        if out.shape != (REQUESTS, PROMPT_TOKENS + NEW_TOKENS):
            raise RuntimeError(f"generate returned {tuple(out.shape)}")
        return wall

    return run


def measure_b7(report: Report, rounds: int, failed: dict[str, str]) -> None:
    """Measure B7 over ``rounds`` interleaved rounds; add its table and targets."""
    from firetitan.local import LocalDeployment

    walls: dict[str, list[float]] = {p: [] for p in PATHS}
    try:
        hf = _hf_generate()
        with (
            tempfile.TemporaryDirectory(prefix="ft-bench-b7-") as root,
            _one_thread_child(),
            LocalDeployment(Path(root), BASE_MODEL) as dep,
        ):
            runs: dict[str, Callable[[], float]] = {
                "concurrent": lambda: asyncio.run(
                    _deployment_run(dep.base_url, dep.model, dep.api_key, True)
                ),
                "one at a time": lambda: asyncio.run(
                    _deployment_run(dep.base_url, dep.model, dep.api_key, False)
                ),
                "HF generate": hf,
            }
            hf()  # warm-up
            for r in range(rounds):
                order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]
                for path in order:
                    walls[path].append(runs[path]())
    except Exception as exc:  # a failed benchmark is reported, never fatal to the others
        failed["B7 deployment"] = f"{type(exc).__name__}: {exc}"
        return
    section(report, walls, rounds)


def section(report: Report, walls: dict[str, list[float]], rounds: int) -> None:
    wall = {p: median(w) for p, w in walls.items()}
    tokens = REQUESTS * NEW_TOKENS
    rows = [
        [
            p,
            fmt(wall[p], 2),
            fmt(tokens / wall[p], 0),
            fmt_ratio(ratio(wall[p], wall["concurrent"])),
        ]
        for p in PATHS
    ]
    report.table(
        "B7 deployment sampling throughput",
        f"{REQUESTS} requests × {NEW_TOKENS} new tokens ({PROMPT_TOKENS}-token prompts, "
        "temperature 1, log-probabilities on) on the `tiny` stand-in, CPU, one torch thread: "
        "concurrent streaming completions against `firetitan deploy` (continuous batching), "
        "the same requests one at a time, and in-process Hugging Face `generate` on the "
        f"same batch; median over {rounds} interleaved rounds.",
        ["path", "median wall (s)", "tokens/s", "wall × concurrent"],
        rows,
    )
    for other, goal, says in (
        ("one at a time", 1 / 8, "≥ 8× faster"),
        ("HF generate", 1 / 0.7, "≥ 0.7× its tokens/s"),
    ):
        per_round = [ratio(c, o) for c, o in zip(walls["concurrent"], walls[other], strict=True)]
        report.targets.append(
            Target(
                f"B7 concurrent wall × {other} (goal: {says})",
                ratio(wall["concurrent"], wall[other]),
                goal,
                "×",
                rounds=per_round,
            )
        )


def _main() -> dict[str, Any]:  # pragma: no cover - a development aid
    report = Report(title="B7")
    failed: dict[str, str] = {}
    measure_b7(report, 1, failed)
    print(report.text())
    return failed


if __name__ == "__main__":  # pragma: no cover
    print(_main())
