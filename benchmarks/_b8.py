"""B8: client CPU per 1,000 samples, firetitan's deployment sampler against fireworks-ai's
`DeploymentSampler`, on the same local deployment.

    python -m benchmarks --only B8             # in the whole table (nox -s bench)
    python -m benchmarks._b8 --rounds 1        # alone, printed

The deployment (``firetitan deploy``, tiny stand-in, continuous batching) runs in its
own process; each peer runs in a fresh process of its own, so the CPU time a peer's
process spends (`time.process_time`, user + system, all threads) is its client cost
alone: building requests, the HTTP connections, parsing the SSE streams. Both peers
sample the same prompts (8 samples a prompt, 4 new tokens each, logprobs on) with at
most 64 requests in flight. Rounds alternate which peer goes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._report import Report, Target, fmt, fmt_ratio, median, ratio

__all__ = ["run_b8"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = ("firetitan", "fireworks")
SAMPLES = 400
BASE_MODEL = "accounts/fireworks/models/qwen3-8b"
PER_PROMPT = 8
MAX_TOKENS = 4
CONCURRENCY = 64
GOAL = 0.5


async def _firetitan(url: str, key: str, model: str, prompts: list[list[int]]) -> None:
    from firetitan import AsyncDeployment, AsyncDeploymentSampler, DeploymentConfig

    account, _, dep = model.removeprefix("accounts/").partition("/deployments/")
    config = DeploymentConfig(
        base_url=url, account=account, deployment_id=dep, max_concurrency=CONCURRENCY
    )
    async with AsyncDeployment(config, api_key=key) as deployment:
        sampler = AsyncDeploymentSampler(deployment)

        async def one(prompt: list[int]) -> Any:
            return await sampler.sample_tokens(
                prompt, num_samples=PER_PROMPT, max_tokens=MAX_TOKENS, temperature=1.0
            )

        await _measure(prompts, one)


async def _fireworks(url: str, key: str, model: str, prompts: list[list[int]]) -> None:
    from fireworks.training.sdk.concurrency import FixedConcurrencyController
    from fireworks.training.sdk.sampling import DeploymentSampler

    sampler = DeploymentSampler(
        inference_url=url,
        model=model,
        api_key=key,
        concurrency_controller=FixedConcurrencyController(CONCURRENCY),
    )

    async def one(prompt: list[int]) -> Any:
        return await sampler.sample_with_prompt_tokens(
            prompt, n=PER_PROMPT, max_tokens=MAX_TOKENS, temperature=1.0, logprobs=True
        )

    await _measure(prompts, one)


async def _measure(prompts: list[list[int]], one: Any) -> None:
    await asyncio.gather(*(one(p) for p in prompts[:4]))  # connections, imports, caches
    cpu, wall = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    samples = sum(len(r) for r in results)
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "samples": samples}), flush=True)


def _worker(peer: str, samples: int) -> None:
    url, key, model = (os.environ[f"B8_{k}"] for k in ("URL", "KEY", "MODEL"))
    prompts = [[256, 48 + (i % 10), 61] for i in range(samples // PER_PROMPT)]
    run = _firetitan if peer == "firetitan" else _fireworks
    asyncio.run(run(url, key, model, prompts))


def _run_peer(peer: str, samples: int, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks._b8", "--worker", peer, "--samples", str(samples)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"B8 {peer} failed:\n{done.stderr[-3000:]}")
    answer: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def run_b8(report: Report, rounds: int, failed: dict[str, str], samples: int = SAMPLES) -> None:
    """Measure B8 over ``rounds`` interleaved rounds; add its table and target."""
    from firetitan.local import LocalDeployment

    runs: dict[str, list[dict[str, float]]] = {p: [] for p in PEERS}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="ft-bench-b8-") as root,
            LocalDeployment(root, BASE_MODEL, size="tiny") as dep,
        ):
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "B8_URL": dep.base_url,
                "B8_KEY": dep.api_key,
                "B8_MODEL": dep.model,
            }
            for r in range(rounds):
                for peer in PEERS[r % 2 :] + PEERS[: r % 2]:
                    runs[peer].append(_run_peer(peer, samples, env))
    except Exception as exc:  # a failed benchmark is reported, never fatal to the others
        failed["B8 deployment sampler"] = f"{type(exc).__name__}: {exc}"
        return
    # Client CPU seconds per 1,000 samples, each run.
    per_k = {p: [1000 * x["cpu_s"] / x["samples"] for x in runs[p]] for p in PEERS}
    cpu = {p: median(v) for p, v in per_k.items()}
    rows = [
        [
            p,
            fmt(cpu[p], 2),
            f"{fmt(min(per_k[p]), 2)}-{fmt(max(per_k[p]), 2)}",
            fmt(median([x["wall_s"] for x in runs[p]]), 1),
            fmt_ratio(ratio(cpu[p], cpu["fireworks"])),
        ]
        for p in PEERS
    ]
    report.table(
        "B8 deployment sampler client CPU",
        f"{samples} samples a run ({PER_PROMPT} per prompt, {MAX_TOKENS} new tokens, "
        f"logprobs on, at most {CONCURRENCY} in flight) from one `firetitan deploy` "
        "(tiny stand-in); CPU time (user + system) of the client process only, each peer "
        f"a fresh process; median over {rounds} interleaved rounds.",
        ["peer", "CPU s / 1,000 samples", "spread", "wall s / run", "× fireworks-ai"],
        rows,
    )
    per_round = [
        ratio(a, b) for a, b in zip(per_k["firetitan"], per_k["fireworks"], strict=True)
    ]
    report.targets.append(Target(
        "B8 client CPU per 1,000 samples × fireworks-ai DeploymentSampler (goal: ≤ 0.5×)",
        ratio(cpu["firetitan"], cpu["fireworks"]), GOAL, "×", rounds=per_round))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.samples)
        return 0
    report = Report(title="B8")
    failed: dict[str, str] = {}
    run_b8(report, args.rounds, failed, args.samples)
    print(report.markdown(None))
    print(failed or "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
