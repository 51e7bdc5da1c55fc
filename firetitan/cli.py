"""The ``firetitan`` command.

Subcommands:

* ``serve``: run the local trainer until SIGINT/SIGTERM.
* ``deploy``: run a local inference deployment (hot-load + completions) until
  SIGINT/SIGTERM (`firetitan.local.deployment`).
* ``demo``: RL fine-tuning end to end on the embedded trainer (`firetitan.demo`).

Each subcommand is a ``_cmd_<name>(args) -> int`` function registered in `build_parser`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from firetitan.cli_keys import ApiKeyError, add_api_key_arguments, api_key_from
from firetitan.cli_logging import add_logging_arguments, configure_logging
from firetitan.demo import command as demo_command

__all__ = ["build_parser", "main"]

T = TypeVar("T")
#: The signals that stop ``serve`` and ``deploy`` gracefully.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firetitan", description="Firetitan SDK tools and the embedded local trainer."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _add_server_command(
        commands,
        "serve",
        _cmd_serve,
        help="run the local trainer",
        description="Serve the Firetitan training protocol on this machine.",
    )
    serve.add_argument("--engine", choices=("torch", "null"), default="torch")
    serve.add_argument("--base-model", default=None, help="model name to serve")
    serve.add_argument(
        "--size",
        choices=("tiny", "small"),
        default="tiny",
        help="stand-in model size (torch engine)",
    )
    serve.add_argument(
        "--weights",
        default=None,
        metavar="DIR",
        help="Hugging Face model folder to load (torch engine)",
    )
    serve.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="DIR",
        help="checkpoint root (default: a temporary folder, removed on exit)",
    )
    serve.add_argument("--job-id", default=None, metavar="ID", help="this trainer's job id")
    serve.add_argument(
        "--deterministic",
        action="store_true",
        help="on CUDA, use deterministic algorithms process-wide (bit-identical reruns, slower)",
    )
    serve.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seeds the stand-in weights, the default LoRA initialisation and unseeded "
        "sampling, as LocalTrainer's seed does (default: %(default)s)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        metavar="N",
        help="largest accepted request body",
    )

    deploy = _add_server_command(
        commands,
        "deploy",
        _cmd_deploy,
        help="run a local inference deployment",
        description="Serve hot-load and completions sampling (the Fireworks deployment "
        "protocol) for the sampler snapshots a local trainer exports under --checkpoint-dir.",
    )
    deploy.add_argument("--base-model", required=True, help="the base model served")
    deploy.add_argument(
        "--checkpoint-dir",
        required=True,
        metavar="DIR",
        help="the trainer's checkpoint root, where its sampler snapshots are",
    )
    deploy.add_argument("--size", choices=("tiny", "small"), default="tiny")
    deploy.add_argument(
        "--weights", default=None, metavar="DIR", help="Hugging Face model folder to load"
    )
    deploy.add_argument("--account", default="local", metavar="ID", help="the account id")
    deploy.add_argument(
        "--deployment-id", default="local-deployment", metavar="ID", help="the deployment id"
    )
    deploy.add_argument("--seed", type=int, default=0, help="stand-in seed (as the trainer's)")

    demo = commands.add_parser(
        "demo",
        help="RL fine-tuning end to end on the embedded trainer",
        description="A supervised warm-up, then GRPO-style RL with a KL penalty, through the "
        "async SDK; writes metrics.jsonl and a plot of the curves.",
    )
    demo_command.add_arguments(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def _add_server_command(
    commands: Any, name: str, func: Callable[[argparse.Namespace], int], **texts: str
) -> argparse.ArgumentParser:
    """Add a subcommand that runs a server, with the options every server takes: the
    address, the API key, the device and logging."""
    parser: argparse.ArgumentParser = commands.add_parser(name, **texts)
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    add_api_key_arguments(parser)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_logging_arguments(parser)
    parser.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``firetitan`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


class _CannotStart(Exception):
    """A server command cannot run: said in one line, exit status 2 (no traceback)."""


def _run_server(
    what: str,
    args: argparse.Namespace,
    serve: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
    *,
    exposure: str,
) -> int:
    """Run ``serve(args)`` until SIGINT/SIGTERM: the part ``serve`` and ``deploy`` share.

    Args:
        what: What it serves (``trainer``, ``deployment``), for the warning.
        args: Its options (``--host``, ``--log-level``, ``--access-log``, ...).
        serve: Starts the server, announces it and waits (see `_serve_until_stopped`).
        exposure: What anyone with the key can do, said when the address is not loopback.
    """
    configure_logging(args.log_level, args.access_log)
    if not _is_loopback(args.host):
        print(
            f"WARNING: binding {args.host}: the {what} is reachable from other machines. "
            f"Anyone with the API key can {exposure}; traffic is plain HTTP.",
            file=sys.stderr,
        )
    try:
        asyncio.run(serve(args))
    except _CannotStart as exc:
        print(f"firetitan {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_key(args: argparse.Namespace) -> tuple[str, bool]:
    """The key to serve with, and whether it was generated (then it is shown once)."""
    try:
        api_key, _source = api_key_from(args)
    except ApiKeyError as exc:
        raise _CannotStart(str(exc)) from None
    if api_key:
        return api_key, False
    from firetitan.local import generate_api_key

    return generate_api_key(), True


async def _serve_until_stopped(
    server: contextlib.AbstractAsyncContextManager[T],
    announce: Callable[[T], None],
    stopping: str,
) -> None:
    """Enter ``server``, ``announce`` what entering returned, and serve until SIGINT or
    SIGTERM; then leave it. A failure to start is said in one line, not as a traceback
    (binding the address, an invalid job id, an unusable checkpoint folder)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                running = await stack.enter_async_context(server)
            except (OSError, ValueError) as exc:
                raise _CannotStart(f"cannot start: {exc}") from None
            announce(running)
            sys.stdout.flush()
            await stop.wait()
            print(stopping, file=sys.stderr)
    finally:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)


#: ``serve``'s options that are `LocalTrainer`'s parameters of the same names.
_SERVE_OPTIONS = (
    "size", "checkpoint_dir", "job_id", "host", "port", "weights", "device",
    "deterministic", "seed",
)  # fmt: skip


def _cmd_serve(args: argparse.Namespace) -> int:
    return _run_server("trainer", args, _serve, exposure="train, read and overwrite checkpoints")


async def _serve(args: argparse.Namespace) -> None:
    # Imported here so that `firetitan --help` stays fast.
    from firetitan.local import DEFAULT_BASE_MODEL, LocalTrainer

    api_key, generated = _api_key(args)
    limits: dict[str, Any] = {"access_log": args.access_log}
    if args.max_request_bytes is not None:
        limits["max_request_bytes"] = args.max_request_bytes
    try:
        trainer = LocalTrainer(
            args.engine,
            base_model=args.base_model or DEFAULT_BASE_MODEL,
            api_key=api_key,
            **{name: getattr(args, name) for name in _SERVE_OPTIONS},
            **limits,
        )
    except (ImportError, ValueError) as exc:
        raise _CannotStart(str(exc)) from None

    def announce(trainer: LocalTrainer) -> None:
        print(f"firetitan local trainer ({args.engine} engine) serving at {trainer.base_url}")
        print(f"job id: {trainer.job_id}; checkpoints under {trainer.checkpoint_dir}")
        if generated:
            print(f"API key (generated, shown once): {api_key}")

    await _serve_until_stopped(trainer, announce, "stopping: finishing in-flight work...")


def _cmd_deploy(args: argparse.Namespace) -> int:
    return _run_server("deployment", args, _deploy, exposure="sample and hot-load")


async def _deploy(args: argparse.Namespace) -> None:
    root = Path(args.checkpoint_dir)
    if not await asyncio.to_thread(root.is_dir):  # said before the slow imports
        raise _CannotStart(f"checkpoint folder {root} does not exist")
    from firetitan.local.deployment.launcher import READY_PREFIX

    try:
        from firetitan.local.deployment.server import DeploymentServer
        from firetitan.local.deployment.snapshots import SnapshotLoader
        from firetitan.local.torch.engine import pick_device
    except ImportError as exc:
        raise _CannotStart(f"needs `pip install 'firetitan[local]'` ({exc})") from None
    api_key, generated = _api_key(args)
    try:
        loader = await asyncio.to_thread(
            SnapshotLoader,
            root,
            args.base_model,
            size=args.size,
            weights=None if args.weights is None else Path(args.weights),
            device=pick_device(args.device),
            seed=args.seed,
        )
        server = DeploymentServer(
            loader,
            api_key,
            account=args.account,
            deployment_id=args.deployment_id,
            access_log=args.access_log,
        )
    except (OSError, ValueError) as exc:
        raise _CannotStart(f"cannot start: {exc}") from None

    def announce(base_url: str) -> None:
        print(f"deployment {server.model} of {args.base_model}; snapshots from {loader.root}")
        if generated:
            print(f"API key (generated, shown once): {api_key}")
        print(f"{READY_PREFIX}{base_url}")

    await _serve_until_stopped(server.serving(args.host, args.port), announce, "stopping...")


def _cmd_demo(args: argparse.Namespace) -> int:
    return demo_command.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
