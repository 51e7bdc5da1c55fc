"""Run the side-by-side benchmarks and write ``benchmarks/RESULTS.md``.

    python -m benchmarks                 # the whole table (nox -s bench)
    python -m benchmarks --quick         # fewer rounds and calls, for development
    python -m benchmarks --only B1,B4    # some benchmarks
    python -m benchmarks --peers floor,firetitan-async
    python -m benchmarks --only RL       # the RL step profile alone

The trainer runs as a separate process (``firetitan serve``, null engine; torch engine
for B6 and RL), and every peer as its own worker process (``benchmarks/_worker.py``).
Rounds are interleaved: round r runs every peer once, in an order rotated by r, so slow
drifts of a shared machine hit every peer alike. See ``benchmarks/README.md``, which
also says how to add a benchmark (`GROUPS`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import attrs

from benchmarks._b7 import measure_b7
from benchmarks._b8 import run_b8
from benchmarks._common import (
    B1_TOKENS,
    B3_DATUMS,
    B3_TOKENS,
    B6_DATUMS,
    B6_TOKENS,
    RESULT_PREFIX,
)
from benchmarks._peers import B3_BUILDS, HANDOFFS
from benchmarks._report import (
    FIREWORKS,
    FLOOR,
    Report,
    Target,
    commit_measured,
    fmt,
    fmt_ratio,
    fmt_spread,
    load_average,
    machine_details,
    median,
    peer_label,
    quantile,
    ratio,
    read_analysis,
    round_ratios,
)
from benchmarks._trainer import Trainer, serve

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = ("floor", "firetitan-async", "firetitan-sync", "fireworks", "tinker")
#: B6 runs torch with one intra-op thread on both sides. With two, a core busy with
#: anything else stalls every OpenMP barrier, and step times swing by several times
#: from one step to the next (measured: 0.3 s on idle cores, 2-8 s beside one busy
#: process).
B6_ENV = {"OMP_NUM_THREADS": "1"}
FIRETITAN = ("firetitan-async", "firetitan-sync")


@attrs.frozen(kw_only=True)
class Plan:
    """How much of each benchmark to run.

    Attributes:
        rounds: Interleaved rounds of B1-B4 (every peer once per round).
        b1_calls: Sequential calls per peer and round (B1).
        b2_pairs: forward_backward + optim_step pairs per batch (B2; one batch a round).
        b3_calls: Large calls per peer and round (B3).
        b4_calls: Calls of each surface per round (B4).
        b5_rounds: Fresh processes per peer (B5).
        b5_futures: Futures in flight (B5).
        b6_rounds: Interleaved rounds of B6.
        b6_steps: SFT steps per path and round (B6).
        rl_steps: Demo RL steps profiled (RL), after one warm-up step.
        b7_rounds: Interleaved rounds of B7 (each of its paths once per round).
        b8_rounds: Interleaved rounds of B8 (each peer a fresh process per round).
        b8_samples: Samples per peer and round (B8).
    """

    rounds: int
    b1_calls: int
    b2_pairs: int
    b3_calls: int
    b4_calls: int
    b5_rounds: int
    b5_futures: int
    b6_rounds: int
    b6_steps: int
    rl_steps: int
    b7_rounds: int
    b8_rounds: int
    b8_samples: int


# The full plan takes about 6 minutes on 2 cores (10 under load); the budget is 12.
FULL = Plan(
    rounds=12, b1_calls=120, b2_pairs=200, b3_calls=3, b4_calls=500, b5_rounds=3,
    b5_futures=1000, b6_rounds=12, b6_steps=1, rl_steps=8,
    b7_rounds=3,
    b8_rounds=3, b8_samples=400,  # B8: about 2 minutes of the total on 2 cores
)  # fmt: skip
QUICK = Plan(
    rounds=2, b1_calls=15, b2_pairs=200, b3_calls=1, b4_calls=40, b5_rounds=1,
    b5_futures=1000, b6_rounds=3, b6_steps=1, rl_steps=2,
    b7_rounds=1,
    b8_rounds=1, b8_samples=200,
)  # fmt: skip

#: The goals each target is judged against (issue #16).
GOAL_B1_FLOOR = 1.15
GOAL_B1_FIREWORKS = 0.35
GOAL_B3_CPU = 0.2
GOAL_B4_US = 50.0
GOAL_B5_MIB = 100e6 / 2**20  # 100 MB; RSS is reported in MiB
GOAL_B6 = 1.15
GOAL_RL_CLIENT = 0.05


class WorkerError(RuntimeError):
    """A worker failed to start or to run a command."""


class Worker:
    """One peer's process, driven one command at a time (see ``_worker.py``)."""

    def __init__(
        self,
        peer: str,
        trainer: Trainer | None,
        log_dir: Path,
        *,
        no_torch: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.peer = peer
        env = {**os.environ, **(env or {}), "PYTHONPATH": _pythonpath()}
        if trainer is not None:
            env.update(
                FIRETITAN_BENCH_URL=trainer.base_url,
                FIRETITAN_BENCH_KEY=trainer.api_key,
                FIRETITAN_BENCH_TRAINER_PID=str(trainer.pid),
            )
        else:
            env.update(FIRETITAN_BENCH_URL="", FIRETITAN_BENCH_KEY="")
        command = [sys.executable, "-m", "benchmarks._worker", peer]
        if no_torch:
            command.append("--no-torch")
        self.log = log_dir / f"worker-{peer}{'-no-torch' if no_torch else ''}.log"
        self._log_file: IO[str] = open(self.log, "a", encoding="utf-8")  # noqa: SIM115
        self._proc = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            bufsize=1,
        )
        self.ready: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        """The set-up answer; raises `WorkerError` if set-up failed."""
        if self.ready is None:
            self.ready = self._read()
        return self.ready

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        """Run one command and return its answer.

        Raises:
            WorkerError: The worker failed the command or died.
        """
        self.wait_ready()
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerError(f"{self.peer}: the worker exited; see {self.log}") from None
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(RESULT_PREFIX):
                answer: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
                if not answer.pop("ok"):
                    raise WorkerError(f"{self.peer}: {answer['error']} (see {self.log})")
                return answer
        raise WorkerError(f"{self.peer}: the worker exited; see {self.log}")

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            assert self._proc.stdin is not None
            self._proc.stdin.write('{"op": "quit"}\n')
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log_file.close()


def _pythonpath() -> str:
    # Workers import `benchmarks` from the repository, wherever the harness was started.
    current = os.environ.get("PYTHONPATH")
    return str(ROOT) if not current else f"{ROOT}{os.pathsep}{current}"


@contextlib.contextmanager
def workers(
    peers: Sequence[str],
    trainer: Trainer | None,
    log_dir: Path,
    failed: dict[str, str],
    env: dict[str, str] | None = None,
) -> Iterator[dict[str, Worker]]:
    """Start one worker per peer (concurrently), yield those that set up.

    A peer that cannot start is recorded in ``failed`` with the reason.
    """
    started = {peer: Worker(peer, trainer, log_dir, env=env) for peer in peers}
    ready: dict[str, Worker] = {}
    try:
        for peer, worker in started.items():
            try:
                worker.wait_ready()
                ready[peer] = worker
            except WorkerError as exc:
                failed[peer] = str(exc)
        yield ready
    finally:
        for worker in started.values():
            worker.close()


def rotated(items: Sequence[str], by: int) -> list[str]:
    """``items`` rotated left by ``by``: round r starts with a different peer."""
    if not items:
        return []
    k = by % len(items)
    return [*items[k:], *items[:k]]


def interleave(
    ready: dict[str, Worker],
    rounds: int,
    op: str,
    failed: dict[str, str],
    **args: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Run ``op`` on every peer, ``rounds`` times, rotating the order each round."""
    out: dict[str, list[dict[str, Any]]] = {peer: [] for peer in ready}
    for r in range(rounds):
        for peer in rotated(list(ready), r):
            if peer in failed:
                continue
            try:
                out[peer].append(ready[peer].ask(op, **args))
            except WorkerError as exc:
                failed[peer] = f"{op}: {exc}"
                out[peer] = []
        _progress(f"{op} round {r + 1}/{rounds}")
    return {peer: answers for peer, answers in out.items() if answers}


def pooled(answers: list[dict[str, Any]], key: str) -> list[float]:
    values: list[float] = []
    for answer in answers:
        value = answer[key]
        values += value if isinstance(value, list) else [value]
    return values


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- sections


def per_round(answers: list[dict[str, Any]], key: str) -> list[list[float]]:
    """The samples of ``key``, round by round."""
    return [a[key] if isinstance(a[key], list) else [a[key]] for a in answers]


def versus(figures: dict[str, float], peer: str, *others: str) -> list[str]:
    """``peer``'s figure as a multiple of each other peer's (``n/a`` for one not run)."""
    return [fmt_ratio(ratio(figures[peer], figures.get(other, math.nan))) for other in others]


def section_b1(report: Report, results: dict[str, list[dict[str, Any]]], plan: Plan) -> None:
    wall = {p: median(pooled(a, "wall")) for p, a in results.items()}
    cpu = {p: median(pooled(a, "cpu")) for p, a in results.items()}
    rows = []
    for peer, answers in results.items():
        samples = pooled(answers, "wall")
        rows.append([
            peer_label(peer),
            fmt(wall[peer] * 1e3, 3),
            fmt_spread(samples, 1e3, 3),
            fmt(quantile(samples, 0.9) * 1e3, 3),
            fmt(cpu[peer] * 1e3, 3),
            *versus(wall, peer, FLOOR, FIREWORKS),
        ])  # fmt: skip
    report.table(
        "B1 latency: one small `forward`, call to result",
        f"1 datum × {B1_TOKENS} tokens, `cross_entropy`; sequential calls, "
        f"{plan.rounds} interleaved rounds × {plan.b1_calls} calls per peer.",
        ["peer", "median (ms)", "p25–p75 (ms)", "p90 (ms)", "client CPU/call (ms)", "× floor",
         "× fireworks-ai"],
        rows,
    )  # fmt: skip
    for peer in FIRETITAN:
        if peer not in results:
            continue
        mine = per_round(results[peer], "wall")
        for other, goal in ((FLOOR, GOAL_B1_FLOOR), (FIREWORKS, GOAL_B1_FIREWORKS)):
            report.targets.append(Target.of_rounds(
                f"B1 {peer_label(peer)} × {peer_label(other)}",
                round_ratios(mine, per_round(results.get(other, []), "wall")), goal, "×",
            ))  # fmt: skip


def section_b2(report: Report, results: dict[str, list[dict[str, Any]]], plan: Plan) -> None:
    wall = {p: median(pooled(a, "wall")) for p, a in results.items()}
    rows = []
    for peer, answers in results.items():
        cpu = median(pooled(answers, "cpu"))
        rows.append([
            peer_label(peer),
            fmt(wall[peer] * 1e3, 1),
            fmt(plan.b2_pairs / wall[peer], 0),
            fmt(cpu * 1e3, 1),
            *versus(wall, peer, FLOOR, FIREWORKS),
        ])  # fmt: skip
    report.table(
        "B2 pipelined throughput",
        f"{plan.b2_pairs} `forward_backward` (1 datum × {B1_TOKENS} tokens) + `optim_step` "
        f"pairs submitted without waiting, then every result read; {plan.rounds} interleaved "
        "rounds.",
        ["peer", "median wall (ms)", "pairs/s", "client CPU (ms)", "× floor", "× fireworks-ai"],
        rows,
    )


def section_b3(
    report: Report,
    results: dict[str, dict[str, list[dict[str, Any]]]],
    plan: Plan,
) -> None:
    rows = []
    for build, by_peer in results.items():
        wall = {p: median(pooled(a, "wall")) for p, a in by_peer.items()}
        cpu = {p: median(pooled(a, "cpu")) for p, a in by_peer.items()}
        for peer, answers in by_peer.items():
            rows.append([
                peer_label(peer),
                build,
                fmt(wall[peer] * 1e3, 1),
                fmt(cpu[peer] * 1e3, 2),
                fmt_spread(pooled(answers, "cpu"), 1e3, 2),
                *versus(wall, peer, FLOOR),
                *versus(cpu, peer, FIREWORKS),
            ])  # fmt: skip
        for peer in FIRETITAN:
            if peer in by_peer:
                report.targets.append(Target.of_rounds(
                    f"B3 client CPU ({build}), {peer_label(peer)} × fireworks-ai",
                    round_ratios(per_round(by_peer[peer], "cpu"),
                                 per_round(by_peer.get(FIREWORKS, []), "cpu")),
                    GOAL_B3_CPU, "×",
                ))  # fmt: skip
    report.table(
        "B3 large batch",
        f"`forward_backward` of {B3_DATUMS} datums × {B3_TOKENS} tokens (target tokens and "
        f"weights); {plan.rounds} interleaved rounds × {plan.b3_calls} calls per peer and "
        "build. *arrays*: the datums are built once from numpy arrays and reused; *lists*: "
        "each call builds its datums from plain Python lists with the SDK's own types, "
        "inside the timing (the floor sends its pre-encoded body either way). Client CPU "
        "is the whole client process (every thread), call to result.",
        ["peer", "build", "median wall (ms)", "client CPU/call (ms)", "CPU p25–p75 (ms)",
         "wall × floor", "CPU × fireworks-ai"],
        rows,
    )  # fmt: skip


def section_b4(report: Report, answers: list[dict[str, Any]], plan: Plan) -> None:
    def us(key: str) -> float:
        return median(pooled(answers, key)) * 1e6

    extra_wall = us("sync_wall") - us("async_wall")
    extra_cpu = us("sync_cpu") - us("async_cpu")
    rows = [
        ["`forward` call → result, wall", fmt(us("async_wall"), 1), fmt(us("sync_wall"), 1),
         fmt(extra_wall, 1)],
        ["`forward` call → result, client CPU", fmt(us("async_cpu"), 1), fmt(us("sync_cpu"), 1),
         fmt(extra_cpu, 1)],
        ["`forward` call → future returned", fmt(us("async_submit"), 1),
         fmt(us("sync_submit"), 1), fmt(us("sync_submit") - us("async_submit"), 1)],
    ]  # fmt: skip
    rows += [
        [f"hand-off alternative: {label}", "", fmt(us(f"handoff_{name}"), 1), ""]
        for name, label in HANDOFFS.items()
        if answers and f"handoff_{name}" in answers[0]
    ]
    report.table(
        "B4 facade overhead",
        f"The same `forward` (1 × {B1_TOKENS} tokens) through the async core and through the "
        f"sync facade in one process, alternating in blocks of 10 calls, {plan.rounds} rounds "
        f"× {plan.b4_calls} calls each. *Extra* is facade − async: the cost of the facade's "
        "two thread hops. The facade's call returns before the request is even encoded (the "
        "loop thread does that), so its *future returned* is shorter. The hand-off "
        "alternatives are bare round trips between the caller and an event-loop thread (a "
        "no-op each way), the least any facade over a loop thread pays; "
        "`scripts/measure_portal.py` times the facade's own hop beside them. Microseconds.",
        ["", "async core (µs)", "sync facade (µs)", "extra (µs)"],
        rows,
    )
    by_round = [
        (median(a["sync_wall"]) - median(a["async_wall"])) * 1e6 for a in answers if a["sync_wall"]
    ]
    report.targets.append(
        Target.of_rounds("B4 facade extra per call (wall)", by_round, GOAL_B4_US, "µs")
    )


def section_b5(report: Report, results: dict[str, list[dict[str, Any]]], plan: Plan) -> None:
    rows = []
    for peer, answers in results.items():
        base = median(pooled(answers, "base_rss"))
        flight = median(pooled(answers, "in_flight_rss"))
        peak = median(pooled(answers, "peak_rss"))
        rows.append([
            peer_label(peer), fmt(base, 1), fmt(flight, 1), fmt(peak, 1), fmt(peak - base, 1),
            fmt(median(pooled(answers, "wall")) * 1e3, 0),
        ])  # fmt: skip
    report.table(
        "B5 memory",
        f"{plan.b5_futures} `forward` futures (1 × {B1_TOKENS} tokens) submitted without "
        "waiting, then all awaited; a fresh client process per peer and round "
        f"({plan.b5_rounds} rounds), as installed without torch (tinker and fireworks-ai "
        "import torch when present, which alone outweighs every client). MiB; *base* is "
        "after set-up (session, model, warm-up calls).",
        ["peer", "base RSS", "RSS, all submitted", "peak RSS", "peak − base", "wall (ms)"],
        rows,
    )
    for peer in FIRETITAN:
        if results.get(peer):
            report.targets.append(Target(
                f"B5 peak RSS, {peer_label(peer)}", median(pooled(results[peer], "peak_rss")),
                GOAL_B5_MIB, "MiB", strict=True, rounds=pooled(results[peer], "peak_rss"),
                per="processes",
            ))  # fmt: skip


def section_b6(report: Report, results: dict[str, list[dict[str, Any]]], plan: Plan) -> None:
    step = {p: median(pooled(a, "wall")) for p, a in results.items()}
    plain = step.get("torch-plain", math.nan)
    labels = {
        "torch-sdk": "firetitan async → local trainer (torch engine)",
        "torch-plain": "plain in-process PyTorch loop",
    }
    rows = [
        [labels.get(p, p), fmt(step[p] * 1e3, 1), fmt_ratio(ratio(step[p], plain))] for p in step
    ]
    report.table(
        "B6 engine overhead",
        f"SFT steps (`forward_backward` + `optim_step`, {B6_DATUMS} datums × {B6_TOKENS} "
        "tokens, cross-entropy, AdamW) on the `small` stand-in (CPU, one torch thread on "
        "each side): through the SDK and the trainer process, against the same model, data "
        f"and optimizer in a plain PyTorch loop; {plan.b6_rounds} interleaved rounds × "
        f"{plan.b6_steps} step.",
        ["path", "median step (ms)", "× plain"],
        rows,
    )
    report.targets.append(Target.of_rounds(
        "B6 SDK + trainer × plain PyTorch",
        round_ratios(per_round(results.get("torch-sdk", []), "wall"),
                     per_round(results.get("torch-plain", []), "wall")),
        GOAL_B6, "×",
    ))  # fmt: skip


def section_rl(report: Report, answers: list[dict[str, Any]], plan: Plan) -> None:
    steps = [step for answer in answers for step in answer["steps"]]
    if not steps:
        return

    def med(key: str) -> float:
        return median([s[key] for s in steps])

    wall = med("wall")
    share = [s["client_cpu"] / s["wall"] for s in steps]
    rows = [
        ["step wall time", fmt(wall * 1e3, 0), "100%"],
        ["sampling phase (all rollouts in flight, until the last returns)",
         fmt(med("sample_wall") * 1e3, 0), f"{med('sample_wall') / wall:.0%}"],
        ["training phase (reference forward, PPO passes, optimizer steps, export)",
         fmt(med("train_wall") * 1e3, 0), f"{med('train_wall') / wall:.0%}"],
        ["trainer process CPU (engine, sampler, HTTP)", fmt(med("trainer_cpu") * 1e3, 0),
         f"{med('trainer_cpu') / wall:.0%}"],
        ["client process CPU (every thread: SDK, I/O, the loop's own arithmetic)",
         fmt(med("client_cpu") * 1e3, 1), f"{median(share):.1%}"],
    ]  # fmt: skip
    profile = answers[-1].get("profile", {})
    for part, fraction in profile.items():
        rows.append([f"  of which {part} (profiled step)",
                     fmt(med("client_cpu") * fraction * 1e3, 1),
                     f"{median(share) * fraction:.1%}"])  # fmt: skip
    rows.append(["client event-loop turns per step", fmt(med("loop_turns"), 0), ""])
    report.table(
        "RL step profile: where a demo RL step's time goes",
        f"The demo's RL step (`firetitan.demo.loop`: {answers[-1]['config']}) on the `tiny` "
        "stand-in, torch engine, CPU: the trainer is `firetitan serve` in its own process "
        "(the demo itself embeds it in-process), the client is the async SDK in another, so "
        f"each side's CPU is its own. {plan.rl_steps} steps after one warm-up step; medians "
        "per step. The client's share is its process CPU over the step's wall time: an "
        "upper bound of its cost, since it includes the loop's own numpy work and waiting "
        "for a loop turn is only as long as the work in that turn. The split of the client's "
        "CPU comes from one more step run under cProfile.",
        ["", "median per step (ms)", "share of the step"],
        rows,
    )
    report.targets.append(Target(
        "RL step: client CPU share of the step", median(share) * 100, GOAL_RL_CLIENT * 100, "%",
        rounds=[x * 100 for x in share], per="steps",
    ))  # fmt: skip


# --------------------------------------------------------------------------- groups


@attrs.define
class Run:
    """One run of the harness: what was asked, and what every group adds to."""

    args: argparse.Namespace
    plan: Plan
    report: Report
    log_dir: Path
    #: Peers that could not run, with the reason (printed under "Run notes").
    failed: dict[str, str] = attrs.field(factory=dict)

    def wants(self, *benchmarks: str) -> bool:
        return any(b in self.args.only for b in benchmarks)


def run_null(run: Run) -> None:
    """B1-B5: one null-engine trainer, every peer in its own worker."""
    plan, report, failed, peers = run.plan, run.report, run.failed, run.args.peers
    _progress("starting the null-engine trainer")
    with serve("null", run.log_dir) as trainer:
        if run.wants("B1", "B2", "B3"):
            # B3 also shows firetitan asking for JSON results only, next to its default.
            extra = ["firetitan-json"] if run.wants("B3") and "firetitan-async" in peers else []
            _progress(f"starting workers: {', '.join([*peers, *extra])}")
            with workers([*peers, *extra], trainer, run.log_dir, failed) as ready:
                main = {peer: worker for peer, worker in ready.items() if peer in peers}
                if run.wants("B1"):
                    results = interleave(main, plan.rounds, "B1", failed, calls=plan.b1_calls)
                    section_b1(report, results, plan)
                if run.wants("B2"):
                    results = interleave(main, plan.rounds, "B2", failed, pairs=plan.b2_pairs)
                    section_b2(report, results, plan)
                if run.wants("B3"):
                    by_build = {
                        build: interleave(
                            ready, plan.rounds, "B3", failed, calls=plan.b3_calls, build=build
                        )
                        for build in B3_BUILDS
                    }
                    section_b3(report, by_build, plan)
        if run.wants("B4"):
            _progress("B4: facade and async core in one process")
            with workers(["facade"], trainer, run.log_dir, failed) as ready:
                answers = interleave(ready, plan.rounds, "B4", failed, calls=plan.b4_calls)
                if answers.get("facade"):
                    section_b4(report, answers["facade"], plan)
        if run.wants("B5"):
            results_b5 = run_b5(plan, trainer, peers, failed, run.log_dir)
            section_b5(report, results_b5, plan)


def run_b6(run: Run) -> None:
    """B6: SFT steps through the SDK and a torch-engine trainer against plain PyTorch."""
    _progress("starting the torch-engine trainer (small stand-in, CPU)")
    torch = ("--size", "small", "--device", "cpu")
    with serve("torch", run.log_dir, extra=torch, env=B6_ENV) as trainer:
        pair = ["torch-sdk", "torch-plain"]
        with workers(pair, trainer, run.log_dir, run.failed, B6_ENV) as ready:
            results = interleave(
                ready, run.plan.b6_rounds, "B6", run.failed, steps=run.plan.b6_steps
            )
    if results:
        section_b6(run.report, results, run.plan)


def run_rl(run: Run) -> None:
    """RL: the demo's RL step against a torch-engine trainer, client and trainer apart."""
    _progress("RL step profile: starting the torch-engine trainer (tiny stand-in, CPU)")
    torch = ("--size", "tiny", "--device", "cpu")
    with (
        serve("torch", run.log_dir, extra=torch, env=B6_ENV) as trainer,
        workers(["rl"], trainer, run.log_dir, run.failed, B6_ENV) as ready,
    ):
        answers = interleave(ready, 1, "RL", run.failed, steps=run.plan.rl_steps)
    if answers.get("rl"):
        section_rl(run.report, answers["rl"], run.plan)


def run_b7(run: Run) -> None:
    """B7: the local deployment's sampling throughput (continuous batching)."""
    _progress("B7: the local deployment (tiny stand-in, CPU)")
    measure_b7(run.report, run.plan.b7_rounds, run.failed)


def run_deployment_sampling(run: Run) -> None:
    """B8: deployment samplers, each peer a fresh process, on one local deployment."""
    _progress("B8: deployment samplers on a local deployment (tiny stand-in, CPU)")
    run_b8(run.report, run.plan.b8_rounds, run.failed, run.plan.b8_samples)


#: Every benchmark, by the group that runs it. A group starts the trainer it needs,
#: runs the benchmarks of its own that were asked for, and adds sections and targets to
#: `Run.report`. To add a benchmark, write its group (or extend one) and list it here;
#: `--only` accepts every id listed.
GROUPS: tuple[tuple[tuple[str, ...], Callable[[Run], None]], ...] = (
    (("B1", "B2", "B3", "B4", "B5"), run_null),
    (("B6",), run_b6),
    (("RL",), run_rl),
    (("B7",), run_b7),
    (("B8",), run_deployment_sampling),
)
BENCHMARKS = tuple(b for ids, _ in GROUPS for b in ids)


def run_b5(
    plan: Plan, trainer: Trainer, peers: Sequence[str], failed: dict[str, str], log_dir: Path
) -> dict[str, list[dict[str, Any]]]:
    """Fresh processes: peak RSS only ever grows, so every sample needs its own."""
    out: dict[str, list[dict[str, Any]]] = {}
    candidates = [p for p in peers if p not in failed]
    for r in range(plan.b5_rounds):
        for peer in rotated(candidates, r):
            worker = Worker(peer, trainer, log_dir, no_torch=True)
            try:
                out.setdefault(peer, []).append(worker.ask("B5", futures=plan.b5_futures))
            except WorkerError as exc:
                failed.setdefault(peer, f"B5: {exc}")
            finally:
                worker.close()
        _progress(f"B5 round {r + 1}/{plan.b5_rounds}")
    return {peer: answers for peer, answers in out.items() if answers}


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated: {','.join(BENCHMARKS)}"
    )
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers")
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds")
    parser.add_argument(
        "--output", type=Path, default=HERE / "RESULTS.md", help="report path (Markdown)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep logs here")
    args = parser.parse_args(argv)
    args.only = [b.strip().upper() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}")
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        plan = attrs.evolve(plan, rounds=args.rounds)
    started = time.monotonic()
    load_before = load_average()
    with contextlib.ExitStack() as stack:
        if args.log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ft-bench-")))
        else:
            log_dir = args.log_dir
            log_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, plan, log_dir)
    elapsed = time.monotonic() - started
    report.header += [
        "",
        f"Whole run: {elapsed:.0f} s; load average (1/5/15 min) {load_before} at the start, "
        f"{load_average()} at the end. A load above the core count means other work shared "
        "the cores: compare ratios (same run, interleaved) rather than absolute figures.",
    ]
    analysis = read_analysis(HERE / "NOTES.md")
    text = report.markdown(analysis)
    print(report.text())
    for target in report.targets:
        if target.met is False:
            _progress(f"MISSED: {target.name}: {fmt(target.figure)} {target.unit} "
                      f"(goal {fmt(target.goal)} {target.unit})")  # fmt: skip
    if not args.no_write:
        args.output.write_text(text, encoding="utf-8")
        _progress(f"wrote {args.output}")
    return 0


def run(args: argparse.Namespace, plan: Plan, log_dir: Path) -> Report:
    report = Report(title="firetitan benchmarks")
    details = {"commit measured": commit_measured(ROOT), **machine_details()}
    command = " ".join(["python -m benchmarks", *sys.argv[1:]])
    report.header += [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}` "
        f"({'quick' if args.quick else 'full'} plan).",
        "",
        *[f"* {name}: {value}" for name, value in details.items()],
        "",
        "The trainer is `firetitan serve` in its own process (null engine, B6 and RL: torch "
        "engine); each peer is its own client process. Medians over every sample of every "
        "round; × floor and × fireworks-ai divide medians of the same run.",
    ]
    state = Run(args=args, plan=plan, report=report, log_dir=log_dir)
    for ids, group in GROUPS:
        if state.wants(*ids):
            group(state)
    for peer, why in state.failed.items():
        report.note(f"{peer_label(peer)} could not run: {why.splitlines()[0][:300]}")
    return report


if __name__ == "__main__":
    sys.exit(main())
