"""`LocalDeployment`: ``firetitan deploy`` as a child process, for tests and the demo.

The deployment runs in its own process, as a real inference deployment runs apart
from the trainer: its batching thread and models never compete with the trainer's
engine lock, and it sees the trainer's snapshots only through the checkpoint folder.
The API key reaches the child through its environment (never its argv, which other
processes can read); the child announces its address on stdout with `READY_PREFIX`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from firetitan.cli_keys import API_KEY_ENV

__all__ = ["READY_PREFIX", "LocalDeployment"]

#: The line prefix ``firetitan deploy`` prints before its base URL once it serves.
READY_PREFIX = "firetitan local deployment serving at "
#: How long a start may take (building the model, importing torch) before it fails.
START_TIMEOUT_SECONDS = 180.0
#: How long a stop waits for a graceful exit before killing the child.
STOP_TIMEOUT_SECONDS = 15.0


class LocalDeployment:
    """A local inference deployment serving the Fireworks hot-load and completions
    protocol at `base_url`, loading the snapshots a local trainer exports.

    Use it as a context manager (``with`` or ``async with``): entering starts
    ``firetitan deploy`` as a child process and waits until it serves; leaving stops it.

    Args:
        checkpoint_dir: The trainer's checkpoint root (``firetitan serve --checkpoint-dir``).
        base_model: The base model the deployment serves (as the trainer's).
        size: Stand-in preset, as the trainer's (``"tiny"``, ``"small"``).
        weights: A Hugging Face model folder, as the trainer's ``weights``.
        api_key: The key clients must send; a random one if None.
        host: Interface to bind; loopback by default.
        port: Port to bind; 0 picks a free one.
        account: The account id the control plane reports.
        deployment_id: The deployment id.
        seed: The stand-in seed, as the trainer's.
        access_log: Log one line per request (``firetitan deploy --access-log``), to
            what `output` returns.

    Attributes:
        base_url: One origin for control plane, hot-load and inference.
        model: ``accounts/{account}/deployments/{deployment_id}``.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        base_model: str,
        *,
        size: str = "tiny",
        weights: str | Path | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        account: str = "local",
        deployment_id: str = "local-deployment",
        seed: int = 0,
        access_log: bool = False,
    ) -> None:
        from firetitan.local import generate_api_key

        self.checkpoint_dir = Path(checkpoint_dir)
        self.base_model = base_model
        self.size = size
        self.weights = None if weights is None else Path(weights)
        self._api_key = api_key or generate_api_key()
        self.host = host
        self.port = port
        self.account = account
        self.deployment_id = deployment_id
        self.seed = seed
        self.access_log = access_log
        self.model = f"accounts/{account}/deployments/{deployment_id}"
        self.base_url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def api_key(self) -> str:
        """The key clients must send (``Authorization: Bearer`` or ``X-Api-Key``)."""
        return self._api_key

    def __repr__(self) -> str:  # never the key
        return f"LocalDeployment(base_url={self.base_url!r}, model={self.model!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a LocalDeployment cannot be pickled (it holds a process and its key)")

    # ------------------------------------------------------------------ sync

    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ async

    async def __aenter__(self) -> LocalDeployment:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    # ------------------------------------------------------------------ process

    def _argv(self) -> list[str]:
        argv = [
            sys.executable, "-m", "firetitan.cli", "deploy",
            "--host", self.host, "--port", str(self.port),
            "--base-model", self.base_model,
            "--checkpoint-dir", str(self.checkpoint_dir),
            "--size", self.size,
            "--account", self.account,
            "--deployment-id", self.deployment_id,
            "--seed", str(self.seed),
        ]  # fmt: skip
        if self.weights is not None:
            argv += ["--weights", str(self.weights)]
        if self.access_log:
            argv.append("--access-log")
        return argv

    def start(self) -> None:
        """Start the child and wait until it serves.

        Raises:
            RuntimeError: It is already running, or it exited or timed out before
                serving (the message holds the end of its output).
        """
        if self._proc is not None:
            raise RuntimeError("the LocalDeployment is already running")
        self._log_dir = tempfile.TemporaryDirectory(prefix="firetitan-deploy-")
        log_path = Path(self._log_dir.name) / "deploy.log"
        env = {**os.environ, API_KEY_ENV: self._api_key}
        # The child imports firetitan the way this process did.
        root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with open(log_path, "wb") as out:
            self._proc = subprocess.Popen(
                self._argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            text = log_path.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith(READY_PREFIX):
                    self.base_url = line[len(READY_PREFIX) :].strip()
                    return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                why = "exited" if self._proc.poll() is not None else "did not start in time"
                self.stop()
                raise RuntimeError(f"firetitan deploy {why}: {text[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the child gracefully (SIGTERM), killing it if it does not exit."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None
        self.base_url = ""

    def output(self) -> str:
        """What the child printed so far (for diagnosing a test)."""
        if self._log_dir is None:
            return ""
        return (Path(self._log_dir.name) / "deploy.log").read_text(errors="replace")
