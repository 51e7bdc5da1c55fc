"""The embedded local trainer: the Firetitan protocol on loopback, with a real or null engine.

```python
from firetitan.local import LocalTrainer

with LocalTrainer(engine="null") as trainer:          # own background thread and loop
    client = FiretitanServiceClient(base_url=trainer.base_url, api_key=trainer.api_key)

async with LocalTrainer(engine="torch") as trainer:   # on the caller's event loop
    ...

with LocalTrainer(deployment=True) as trainer:        # plus an inference deployment
    trainer.deployment.base_url, trainer.deployment.model
```
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firetitan.local.checkpoints import CheckpointStore
from firetitan.local.config import ServerConfig
from firetitan.local.deployment import LocalDeployment
from firetitan.local.engine import Engine
from firetitan.local.executor import ExecutionRecord
from firetitan.local.null_engine import DEFAULT_BASE_MODEL, NullEngine
from firetitan.local.server import TrainerServer

__all__ = [
    "DEFAULT_BASE_MODEL",
    "ExecutionRecord",
    "LocalDeployment",
    "LocalTrainer",
    "ServerConfig",
    "generate_api_key",
]


def generate_api_key() -> str:
    """A random key that both client populations accept: tinker 0.38 requires the
    ``tml-`` prefix, the Fireworks SDK takes any key."""
    return f"tml-{secrets.token_hex(24)}"


def engine_factory(
    engine: str | Engine,
    *,
    base_model: str,
    size: str,
    weights: str | Path | None,
    device: str,
    seed: int,
    deterministic: bool = False,
) -> Callable[[], Engine]:
    """A function that builds the engine (called on the engine thread at start).

    Raises:
        ValueError: Unknown engine name.
        ImportError: ``"torch"`` without the ``local`` extra installed.
    """
    if isinstance(engine, Engine):
        return lambda: engine
    if engine == "null":
        return lambda: NullEngine(base_model, seed=seed)
    if engine == "torch":
        try:
            from firetitan.local.torch import TorchEngine
        except ImportError as exc:
            raise ImportError(
                f"the torch engine could not be imported ({exc}); it needs "
                "`pip install 'firetitan[local]'`"
            ) from exc
        return lambda: TorchEngine(
            base_model=base_model,
            size=size,
            weights=weights,
            device=device,
            seed=seed,
            deterministic=deterministic,
        )
    raise ValueError(f"engine must be 'torch', 'null' or an Engine instance, got {engine!r}")


class LocalTrainer:
    """A local trainer serving the Firetitan protocol on ``base_url``.

    Use it as a context manager: ``with`` runs the server on its own thread and event
    loop; ``async with`` runs it on the caller's loop. Either way, leaving the block stops
    it gracefully and removes a temporary checkpoint folder.

    Args:
        engine: ``"torch"`` (real training; needs ``firetitan[local]``), ``"null"`` (no
            model compute: right shapes, deterministic values), or an `Engine` instance.
        base_model: The model name served by default.
        size: Stand-in model preset of the torch engine (``"tiny"``, ``"small"``).
        checkpoint_dir: Checkpoint root; a temporary folder (removed on exit) if None.
        job_id: This trainer's job id (``cross_job://`` names it); random if None.
        api_key: The key clients must send; a random ``tml-...`` key if None.
        host: Interface to bind; loopback by default.
        port: Port to bind; 0 picks a free one.
        weights: A Hugging Face model folder for the torch engine.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (torch engine). No device choice
            changes process-wide torch settings.
        deterministic: On CUDA, switch the process to deterministic algorithms
            (bit-identical reruns, slower); see `TorchEngine`.
        seed: Seeds the engine: the stand-in weights (trainers with the same seed,
            model and size start from identical weights), the LoRA initialisation of
            models created without a seed of their own, and unseeded sampling (null
            engine: every generated value). The ``--seed`` of ``firetitan serve``.
        deployment: Also start a `LocalDeployment` (``trainer.deployment``) over the
            same checkpoint folder, base model, size, weights and seed, sharing the API
            key, for sampling hot-loaded snapshots the Fireworks way.
        **limits: `ServerConfig` fields (``long_poll_seconds=...``, ...).

    Attributes:
        base_url: Where clients reach the trainer (``http://127.0.0.1:<port>``), set
            once it is started.
        job_id: This trainer's job id: its checkpoints live under
            ``<checkpoint_dir>/<job_id>/``, and other jobs load them as
            ``cross_job://<job_id>/<name>``.
        checkpoint_dir: The checkpoint root in use, set once started.
        host: The interface it binds.
        port: The port it asked for (0: any free one; see ``base_url``).
        config: Its `ServerConfig`.

    Raises:
        TypeError: An unknown keyword in ``limits``.
    """

    def __init__(
        self,
        engine: str | Engine = "torch",
        *,
        base_model: str = DEFAULT_BASE_MODEL,
        size: str = "tiny",
        checkpoint_dir: str | Path | None = None,
        job_id: str | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        weights: str | Path | None = None,
        device: str = "auto",
        seed: int = 0,
        deterministic: bool = False,
        deployment: bool = False,
        **limits: Any,
    ) -> None:
        unknown = set(limits) - ServerConfig.field_names()
        if unknown:
            raise TypeError(f"unknown LocalTrainer options: {', '.join(sorted(unknown))}")
        self.config = ServerConfig(**limits)
        # The model the trainer trains, and that its deployment serves.
        model: dict[str, Any] = {
            "base_model": base_model, "size": size, "weights": weights, "seed": seed,
        }  # fmt: skip
        self._factory = engine_factory(engine, device=device, deterministic=deterministic, **model)
        self._engine_name = engine if isinstance(engine, str) else type(engine).__name__
        self._requested_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.job_id = job_id or f"job-{secrets.token_hex(4)}"
        self._api_key = api_key or generate_api_key()
        self.host = host
        self.port = port
        self.base_url = ""
        self.checkpoint_dir: Path | None = None
        self._temp_dir: Path | None = None
        self._server: TrainerServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._deployment_args = model if deployment else None
        self._deployment: LocalDeployment | None = None

    @property
    def api_key(self) -> str:
        """The key clients must send in ``X-API-Key``."""
        return self._api_key

    def __repr__(self) -> str:  # never the key
        return (
            f"LocalTrainer(engine={self._engine_name!r}, base_url={self.base_url!r}, "
            f"job_id={self.job_id!r})"
        )

    def __reduce__(self) -> Any:
        raise TypeError("a LocalTrainer cannot be pickled (it holds a live server and its key)")

    @property
    def server(self) -> TrainerServer:
        if self._server is None:
            raise RuntimeError("the LocalTrainer is not running")
        return self._server

    @property
    def deployment(self) -> LocalDeployment:
        """The inference deployment started with ``deployment=True``."""
        if self._deployment is None:
            raise RuntimeError(
                "no deployment: create the LocalTrainer with deployment=True and enter it"
            )
        return self._deployment

    @property
    def engine(self) -> Engine:
        """The running engine (for in-process inspection)."""
        return self.server.engine

    @property
    def execution_log(self) -> list[ExecutionRecord]:
        """Requests executed so far, in order: ``(model_id, seq_id, request_id, kind)``."""
        return self.server.execution_log

    def pause(self, reason: str = "the trainer is paused by its operator") -> None:
        """Hold the trainer's queue: requests already running finish, no other starts
        until `resume`. Clients polling the waiting requests hear queue state
        ``paused_capacity`` with ``reason`` (tinker's ``queue_state_reason``), and
        firetitan's and tinker's clients log it. From any thread.
        """
        self._on_server_loop(lambda: self.server.pause(reason))

    def resume(self) -> None:
        """End a `pause`: the held requests run, in order. From any thread."""
        self._on_server_loop(self.server.resume)

    def _on_server_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop that serves (the caller's with ``async with``)."""
        loop = self._loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is None or current is loop:
            fn()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(run)
        done.result()

    # ------------------------------------------------------------------ async

    async def __aenter__(self) -> LocalTrainer:
        await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the LocalTrainer is already running")
        if self._requested_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="firetitan-checkpoints-"))
        root = self._requested_dir or self._temp_dir
        assert root is not None
        self.checkpoint_dir = root
        try:
            store = CheckpointStore(root, self.job_id)
            server = TrainerServer(self._factory, store, self._api_key, self.config)
            self.base_url = await server.start(self.host, self.port)
        except BaseException:
            self._remove_temp_dir()
            raise
        self._server = server
        if self._deployment_args is not None:
            deployment = LocalDeployment(root, api_key=self._api_key, **self._deployment_args)
            try:
                await deployment.__aenter__()
            except BaseException:
                await self._close()
                raise
            self._deployment = deployment

    async def _close(self) -> None:
        server, self._server = self._server, None
        deployment, self._deployment = self._deployment, None
        try:
            if deployment is not None:
                await deployment.__aexit__(None, None, None)
            if server is not None:
                await server.close()
        finally:
            if self._temp_dir is not None:
                await asyncio.to_thread(self._remove_temp_dir)

    def _remove_temp_dir(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # ------------------------------------------------------------------ sync

    def __enter__(self) -> LocalTrainer:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve_in_thread(ready)),
            name="firetitan-local-trainer",
            daemon=True,
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        loop.call_soon_threadsafe(stop.set)
        thread.join()
        self._thread = self._loop = self._stop = None

    async def _serve_in_thread(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self._start()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        await self._stop.wait()
        await self._close()
