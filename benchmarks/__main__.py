"""Run the side-by-side benchmarks and write ``benchmarks/RESULTS.md``.

    python -m benchmarks                 # the whole table (nox -s bench)
    python -m benchmarks --quick         # fewer rounds and calls, for development
    python -m benchmarks --only B1,B4    # some benchmarks
    python -m benchmarks --peers floor,firetitan-async

The trainer runs as a separate process (``firetitan serve``, null engine; torch engine
for B6), and every peer as its own worker process (``benchmarks/_worker.py``). Rounds
are interleaved: round r runs every peer once, in an order rotated by r, so slow drifts
of a shared machine hit every peer alike. See ``benchmarks/README.md``.
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
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import attrs

from benchmarks._b7 import run_b7
from benchmarks._common import (
    B1_TOKENS,
    B3_DATUMS,
    B3_TOKENS,
    B6_DATUMS,
    B6_TOKENS,
    RESULT_PREFIX,
)
from benchmarks._report import (
    FIREWORKS,
    FLOOR,
    Report,
    Target,
    fmt,
    fmt_ratio,
    load_average,
    machine_details,
    median,
    peer_label,
    quantile,
    ratio,
    read_analysis,
)
from benchmarks._trainer import Trainer, serve

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHMARKS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")
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
        codec_repeats: Timed repeats of each codec step (B3).
        b6_rounds: Interleaved rounds of B6.
        b6_steps: SFT steps per path and round (B6).
        b7_rounds: Interleaved rounds of B7 (each path once per round).
    """

    rounds: int
    b1_calls: int
    b2_pairs: int
    b3_calls: int
    b4_calls: int
    b5_rounds: int
    b5_futures: int
    codec_repeats: int
    b6_rounds: int
    b6_steps: int
    b7_rounds: int


# The full plan takes about 3 minutes on 2 cores (4 under load); the issue allows 10.
FULL = Plan(
    rounds=9, b1_calls=120, b2_pairs=200, b3_calls=2, b4_calls=500, b5_rounds=3,
    b5_futures=1000, codec_repeats=9, b6_rounds=12, b6_steps=1, b7_rounds=3,
)  # fmt: skip
QUICK = Plan(
    rounds=2, b1_calls=15, b2_pairs=200, b3_calls=1, b4_calls=40, b5_rounds=1,
    b5_futures=1000, codec_repeats=2, b6_rounds=3, b6_steps=1, b7_rounds=1,
)  # fmt: skip


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
            env.update(FIRETITAN_BENCH_URL=trainer.base_url, FIRETITAN_BENCH_KEY=trainer.api_key)
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


def _peer_rows(peers: Sequence[str], failed: dict[str, str]) -> list[str]:
    return [p for p in peers if p not in failed]


def section_b1(
    report: Report, results: dict[str, list[dict[str, Any]]], plan: Plan, rounds: int
) -> dict[str, float]:
    wall = {p: median(pooled(a, "wall")) for p, a in results.items()}
    cpu = {p: median(pooled(a, "cpu")) for p, a in results.items()}
    rows = []
    for peer, answers in results.items():
        samples = pooled(answers, "wall")
        rows.append([
            peer_label(peer),
            fmt(wall[peer] * 1e3, 3),
            fmt(quantile(samples, 0.9) * 1e3, 3),
            fmt(cpu[peer] * 1e3, 3),
            fmt_ratio(ratio(wall[peer], wall.get(FLOOR, math.nan))),
            fmt_ratio(ratio(wall[peer], wall.get(FIREWORKS, math.nan))),
        ])  # fmt: skip
    report.table(
        "B1 latency: one small `forward`, call to result",
        f"1 datum × {B1_TOKENS} tokens, `cross_entropy`; sequential calls, "
        f"{rounds} interleaved rounds × {plan.b1_calls} calls per peer.",
        ["peer", "median (ms)", "p90 (ms)", "client CPU/call (ms)", "× floor", "× fireworks-ai"],
        rows,
    )
    return wall


def section_b2(
    report: Report, results: dict[str, list[dict[str, Any]]], plan: Plan, rounds: int
) -> None:
    wall = {p: median(pooled(a, "wall")) for p, a in results.items()}
    rows = []
    for peer, answers in results.items():
        cpu = median(pooled(answers, "cpu"))
        rows.append([
            peer_label(peer),
            fmt(wall[peer] * 1e3, 1),
            fmt(plan.b2_pairs / wall[peer], 0),
            fmt(cpu * 1e3, 1),
            fmt_ratio(ratio(wall[peer], wall.get(FLOOR, math.nan))),
            fmt_ratio(ratio(wall[peer], wall.get(FIREWORKS, math.nan))),
        ])  # fmt: skip
    report.table(
        "B2 pipelined throughput",
        f"{plan.b2_pairs} `forward_backward` (1 datum × {B1_TOKENS} tokens) + `optim_step` "
        f"pairs submitted without waiting, then every result read; {rounds} interleaved "
        "rounds.",
        ["peer", "median wall (ms)", "pairs/s", "client CPU (ms)", "× floor", "× fireworks-ai"],
        rows,
    )


def section_b3(
    report: Report,
    results: dict[str, list[dict[str, Any]]],
    codec: dict[str, Any] | None,
    plan: Plan,
    rounds: int,
) -> dict[str, float]:
    wall = {p: median(pooled(a, "wall")) for p, a in results.items()}
    cpu = {p: median(pooled(a, "cpu")) for p, a in results.items()}
    rows = [
        [
            peer_label(peer),
            fmt(wall[peer] * 1e3, 1),
            fmt(cpu[peer] * 1e3, 1),
            fmt_ratio(ratio(wall[peer], wall.get(FLOOR, math.nan))),
            fmt_ratio(ratio(cpu[peer], cpu.get(FIREWORKS, math.nan))),
        ]
        for peer in results
    ]
    report.table(
        "B3 large batch",
        f"`forward_backward` of {B3_DATUMS} datums × {B3_TOKENS} tokens (target tokens and "
        f"weights); {rounds} interleaved rounds × {plan.b3_calls} calls per peer. Client CPU "
        "is the whole client process (every thread), call to result.",
        ["peer", "median wall (ms)", "client CPU/call (ms)", "wall × floor", "CPU × fireworks-ai"],
        rows,
    )
    if codec:
        names = {
            "encode_request": ("client: encode request (encode_request + dumps)", "request_mb"),
            "decode_result": ("client: decode result (loads + decode + combine)", "result_mb"),
            "decode_request": ("trainer: decode request (loads + decode_request)", "request_mb"),
            "encode_result": ("trainer: encode result (encode + dumps)", "result_mb"),
            "orjson_dumps_request": ("floor: orjson.dumps of the request document", "request_mb"),
            "orjson_loads_result": ("floor: orjson.loads of the result body", "result_mb"),
        }
        codec_rows = [
            [label, fmt(median(codec[name]), 0), fmt(codec[size], 2)]
            for name, (label, size) in names.items()
        ]
        report.table(
            "B3 codec throughput",
            f"firetitan's codec (`firetitan._wire`) on the B3 batch, in one process without "
            f"network, {plan.codec_repeats} repeats; bare orjson on the same JSON documents "
            "as the floor.",
            ["step", "median MB/s", "body (MB)"],
            codec_rows,
        )
    return cpu


def section_b4(report: Report, answers: list[dict[str, Any]], plan: Plan, rounds: int) -> float:
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
        ["hop alone (resolved future), wall", "", fmt(us("hop_wall"), 1), fmt(us("hop_wall"), 1)],
        ["hop alone (resolved future), CPU", "", fmt(us("hop_cpu"), 1), fmt(us("hop_cpu"), 1)],
    ]  # fmt: skip
    report.table(
        "B4 facade overhead",
        f"The same `forward` (1 × {B1_TOKENS} tokens) through the async core and through the "
        f"sync facade in one process, alternating in blocks of 10 calls, {rounds} rounds × "
        f"{plan.b4_calls} calls each. *Extra* is facade − async: the cost of the facade's two "
        "thread hops. The facade's call returns before the request is even encoded (the "
        "loop thread does that), so its *future returned* is shorter. The last rows time "
        "the hop alone: a call whose async future is already resolved. Microseconds.",
        ["", "async core (µs)", "sync facade (µs)", "extra (µs)"],
        rows,
    )
    return extra_wall


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
        "import torch when present, which alone adds about 180 MB). MiB; *base* is after "
        "set-up (session, model, warm-up calls).",
        ["peer", "base RSS", "RSS, all submitted", "peak RSS", "peak − base", "wall (ms)"],
        rows,
    )


def section_b6(report: Report, results: dict[str, list[dict[str, Any]]], plan: Plan) -> float:
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
    return ratio(step.get("torch-sdk", math.nan), plain)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help="comma-separated: B1,B2,...,B7"
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
    if not args.no_write:
        args.output.write_text(text, encoding="utf-8")
        _progress(f"wrote {args.output}")
    return 0


def run(args: argparse.Namespace, plan: Plan, log_dir: Path) -> Report:
    only, peers = args.only, args.peers
    failed: dict[str, str] = {}
    report = Report(title="firetitan benchmarks")
    details = machine_details()
    command = " ".join(["python -m benchmarks", *sys.argv[1:]])
    report.header += [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}` "
        f"({'quick' if args.quick else 'full'} plan).",
        "",
        *[f"* {name}: {value}" for name, value in details.items()],
        "",
        "The trainer is `firetitan serve` in its own process (null engine, B6: torch "
        "engine); each peer is its own client process. Medians over every sample of every "
        "round; × floor and × fireworks-ai divide medians of the same run.",
    ]

    if any(b in only for b in ("B1", "B2", "B3", "B4", "B5")):
        _progress("starting the null-engine trainer")
        with serve("null", log_dir) as trainer:
            run_null(report, plan, trainer, only, peers, failed, log_dir)
    if "B6" in only:
        _progress("starting the torch-engine trainer (small stand-in, CPU)")
        torch = ("--size", "small", "--device", "cpu")
        with serve("torch", log_dir, extra=torch, env=B6_ENV) as trainer:
            run_b6(report, plan, trainer, failed, log_dir)
    if "B7" in only:
        _progress("B7: the local deployment (tiny stand-in, CPU)")
        run_b7(report, plan.b7_rounds, failed)
    for peer, why in failed.items():
        report.note(f"{peer_label(peer)} could not run: {why.splitlines()[0][:300]}")
    return report


def run_null(
    report: Report,
    plan: Plan,
    trainer: Trainer,
    only: Sequence[str],
    peers: Sequence[str],
    failed: dict[str, str],
    log_dir: Path,
) -> None:
    rounds = plan.rounds
    b1_wall: dict[str, float] = {}
    b3_cpu: dict[str, float] = {}
    if any(b in only for b in ("B1", "B2", "B3")):
        # B3 also shows firetitan asking for JSON results only, next to its default.
        extra = ["firetitan-json"] if "B3" in only and "firetitan-async" in peers else []
        _progress(f"starting workers: {', '.join([*peers, *extra])}")
        with workers([*peers, *extra], trainer, log_dir, failed) as ready:
            main = {peer: worker for peer, worker in ready.items() if peer in peers}
            if "B1" in only:
                results = interleave(main, rounds, "B1", failed, calls=plan.b1_calls)
                b1_wall = section_b1(report, results, plan, rounds)
            if "B2" in only:
                results = interleave(main, rounds, "B2", failed, pairs=plan.b2_pairs)
                section_b2(report, results, plan, rounds)
            if "B3" in only:
                results = interleave(ready, rounds, "B3", failed, calls=plan.b3_calls)
                codec = _codec(plan, log_dir, failed)
                b3_cpu = section_b3(report, results, codec, plan, rounds)
    if "B1" in only:
        for peer in FIRETITAN:
            wall = b1_wall.get(peer, math.nan)
            report.targets.append(Target(
                f"B1 {peer_label(peer)} × floor", ratio(wall, b1_wall.get(FLOOR, math.nan)),
                1.3, "×"))  # fmt: skip
            report.targets.append(Target(
                f"B1 {peer_label(peer)} × fireworks-ai",
                ratio(wall, b1_wall.get(FIREWORKS, math.nan)), 0.5, "×"))  # fmt: skip
    if "B3" in only:
        for peer in FIRETITAN:
            report.targets.append(Target(
                f"B3 client CPU, {peer_label(peer)} × fireworks-ai",
                ratio(b3_cpu.get(peer, math.nan), b3_cpu.get(FIREWORKS, math.nan)), 0.25, "×",
            ))  # fmt: skip
    if "B4" in only:
        _progress("B4: facade and async core in one process")
        with workers(["facade"], trainer, log_dir, failed) as ready:
            if "facade" in ready:
                answers = interleave(ready, rounds, "B4", failed, calls=plan.b4_calls)
                if answers.get("facade"):
                    extra = section_b4(report, answers["facade"], plan, rounds)
                    report.targets.append(
                        Target("B4 facade extra per call (wall)", extra, 50.0, "µs")
                    )
    if "B5" in only:
        results_b5 = run_b5(plan, trainer, peers, failed, log_dir)
        section_b5(report, results_b5, plan)
        for peer in FIRETITAN:
            if results_b5.get(peer):
                peak = median(pooled(results_b5[peer], "peak_rss"))
                # The goal is 100 MB; RSS is reported in MiB (1 MiB = 1.048576 MB).
                report.targets.append(
                    Target(f"B5 peak RSS, {peer_label(peer)}", peak, 100e6 / 2**20, "MiB",
                           strict=True)
                )  # fmt: skip


def _codec(plan: Plan, log_dir: Path, failed: dict[str, str]) -> dict[str, Any] | None:
    _progress("B3: codec throughput")
    with workers(["codec"], None, log_dir, failed) as ready:
        if "codec" not in ready:
            return None
        try:
            return ready["codec"].ask("codec", repeats=plan.codec_repeats)
        except WorkerError as exc:
            failed["codec"] = str(exc)
            return None


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


def run_b6(
    report: Report, plan: Plan, trainer: Trainer, failed: dict[str, str], log_dir: Path
) -> None:
    with workers(["torch-sdk", "torch-plain"], trainer, log_dir, failed, B6_ENV) as ready:
        results = interleave(ready, plan.b6_rounds, "B6", failed, steps=plan.b6_steps)
    if results:
        overhead = section_b6(report, results, plan)
        report.targets.append(Target("B6 SDK + trainer × plain PyTorch", overhead, 1.15, "×"))


if __name__ == "__main__":
    sys.exit(main())
