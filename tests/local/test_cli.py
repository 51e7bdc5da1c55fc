"""``firetitan serve`` as a user runs it: a real process, stopped by a signal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker

from firetitan.cli import main
from firetitan.local import LocalTrainer
from firetitan.local.null_engine import DEFAULT_BASE_MODEL


def start_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``firetitan serve --engine null <args>`` in a child with environment ``env`` (by
    default this process's)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from firetitan.cli import main; raise SystemExit(main())",
            "serve",
            "--engine",
            "null",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_until(proc: subprocess.Popen[str], pattern: str) -> tuple[re.Match[str], list[str]]:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match, lines
    raise AssertionError(f"no {pattern!r} in output: {lines}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:  # never leave a server behind, even when a test fails
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def healthz(base_url: str, key: str) -> object:
    request = urllib.request.Request(f"{base_url}/api/v1/healthz", headers={"X-API-Key": key})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize(
    ("sig", "key_from_env"),
    [(signal.SIGINT, False), (signal.SIGTERM, True)],
    ids=["SIGINT-flag-key", "SIGTERM-env-key"],
)
def test_serve_prints_url_and_stops_gracefully(
    processes: list[subprocess.Popen[str]],
    tmp_path: Path,
    sig: signal.Signals,
    key_from_env: bool,
) -> None:
    key = "tml-cli-test"
    args = ["--checkpoint-dir", str(tmp_path), "--job-id", "cli-job", "--port", "0"]
    if key_from_env:
        proc = start_serve(*args, env={**os.environ, "FIRETITAN_API_KEY": key})
    else:
        proc = start_serve(*args, "--api-key", key)
    processes.append(proc)
    match, lines = read_until(proc, r"serving at (http://127\.0\.0\.1:\d+)")
    base_url = match.group(1)
    assert healthz(base_url, key) == {"status": "ok"}
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    printed = "".join(lines) + out + err
    assert key not in printed  # a key the user chose is never printed
    assert "API key" not in printed
    assert (tmp_path / "cli-job").is_dir()


def test_serve_generates_and_prints_a_key_once(processes: list[subprocess.Popen[str]]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FIRETITAN_API_KEY"}
    proc = start_serve(env=env)
    processes.append(proc)
    url, _ = read_until(proc, r"serving at (\S+)")
    key, _ = read_until(proc, r"API key \(generated, shown once\): (tml-[0-9a-f]+)")
    assert healthz(url.group(1), key.group(1)) == {"status": "ok"}
    proc.send_signal(signal.SIGINT)
    out, _err = proc.communicate(timeout=60)
    assert key.group(1) not in out


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "demo" in out


def test_serve_access_log_and_debug_engine_steps(processes: list[subprocess.Popen[str]]) -> None:
    """``--access-log`` prints one line per request with its ids, never the key;
    ``--log-level debug`` adds a line per engine step."""
    key = "tml-access-log-secret"
    proc = start_serve("--api-key", key, "--access-log", "--log-level", "debug")
    processes.append(proc)
    match, _ = read_until(proc, r"serving at (\S+)")
    base_url = match.group(1)
    script = (
        "import sys, tinker\n"
        "from firetitan import FiretitanServiceClient\n"
        "with FiretitanServiceClient(base_url=sys.argv[1], api_key=sys.argv[2]) as sc:\n"
        "    tc = sc.create_lora_training_client('accounts/fireworks/models/qwen3-8b')\n"
        "    datum = tinker.Datum(model_input=tinker.ModelInput.from_ints([1, 2, 3]),\n"
        "        loss_fn_inputs={'target_tokens': [2, 3, 4]})\n"
        "    tc.forward_backward([datum], 'cross_entropy').result()\n"
    )
    subprocess.run([sys.executable, "-c", script, base_url, key], check=True, timeout=120)
    with pytest.raises(urllib.error.HTTPError):
        healthz(base_url, "tml-wrong-key")
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert key not in err
    access = [line for line in err.splitlines() if "firetitan.access" in line]
    fwdbwd = [line for line in access if "POST /api/v1/forward_backward 200" in line]
    assert len(fwdbwd) == 1, access
    assert re.search(r" \d+\.\d ms model_id=\S+:train:\d+ seq_id=1 request_id=\S+$", fwdbwd[0])
    assert any("POST /api/v1/create_session 200" in line for line in access)
    assert any("GET /api/v1/healthz 401" in line for line in access)
    assert re.search(r"DEBUG firetitan\.local: ran forward_backward \(model \S+, seq 1,", err)


def test_serve_without_access_log_prints_no_request_lines(
    processes: list[subprocess.Popen[str]],
) -> None:
    proc = start_serve("--api-key", "tml-k", "--log-level", "debug")
    processes.append(proc)
    match, _ = read_until(proc, r"serving at (\S+)")
    assert healthz(match.group(1), "tml-k") == {"status": "ok"}
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert "healthz" not in err


def _logprobs(base_url: str, key: str) -> list[float]:
    from firetitan import FiretitanServiceClient

    with FiretitanServiceClient(base_url=base_url, api_key=key) as service:
        tc = service.create_training_client(base_model=DEFAULT_BASE_MODEL, lora_rank=0)
        datum = tinker.Datum(
            model_input=tinker.ModelInput.from_ints([1, 2, 3, 4]),
            loss_fn_inputs={"target_tokens": [2, 3, 4, 5]},
        )
        out = tc.forward([datum], "cross_entropy").result(30)
        return list(out.loss_fn_outputs[0]["logprobs"].tolist())


def test_serve_seed_means_what_local_trainer_seed_means(
    processes: list[subprocess.Popen[str]],
) -> None:
    key = "tml-seed-test"
    proc = start_serve("--api-key", key, "--seed", "7")
    processes.append(proc)
    match, _ = read_until(proc, r"serving at (http://127\.0\.0\.1:\d+)")
    served = _logprobs(match.group(1), key)
    with LocalTrainer("null", seed=7) as same, LocalTrainer("null", seed=0) as other:
        assert served == _logprobs(same.base_url, same.api_key)
        assert served != _logprobs(other.base_url, other.api_key)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_serve_with_a_key_file_keeps_the_key_out_of_the_process_list(
    processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    key = "tml-secret-from-file"
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    proc = start_serve("--api-key-file", str(key_file))
    processes.append(proc)
    match, lines = read_until(proc, r"serving at (http://127\.0\.0\.1:\d+)")
    assert healthz(match.group(1), key) == {"status": "ok"}
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    assert key.encode() not in cmdline
    assert key not in "".join(lines)  # a key the user chose is never printed
