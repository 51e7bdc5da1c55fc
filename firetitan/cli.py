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
import ipaddress
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from firetitan.cli_keys import ApiKeyError, add_api_key_arguments, api_key_from
from firetitan.cli_logging import add_logging_arguments, configure_logging
from firetitan.demo import command as demo_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firetitan", description="Firetitan SDK tools and the embedded local trainer."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the local trainer",
        description="Serve the Firetitan training protocol on this machine.",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    serve.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    add_api_key_arguments(serve)
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
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
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
    add_logging_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    deploy = commands.add_parser(
        "deploy",
        help="run a local inference deployment",
        description="Serve hot-load and completions sampling (the Fireworks deployment "
        "protocol) for the sampler snapshots a local trainer exports under --checkpoint-dir.",
    )
    deploy.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    deploy.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    add_api_key_arguments(deploy)
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
    deploy.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    deploy.add_argument("--seed", type=int, default=0, help="stand-in seed (as the trainer's)")
    deploy.set_defaults(func=_cmd_deploy)

    demo = commands.add_parser(
        "demo",
        help="RL fine-tuning end to end on the embedded trainer",
        description="A supervised warm-up, then GRPO-style RL with a KL penalty, through the "
        "async SDK; writes metrics.jsonl and a plot of the curves.",
    )
    demo_command.add_arguments(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``firetitan`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.access_log)
    if not _is_loopback(args.host):
        print(
            f"WARNING: binding {args.host}: the trainer is reachable from other machines. "
            "Anyone with the API key can train, read and overwrite checkpoints; traffic is "
            "plain HTTP.",
            file=sys.stderr,
        )
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


async def _serve(args: argparse.Namespace) -> int:
    # Imported here so that `firetitan --help` stays fast.
    from firetitan.local import LocalTrainer, generate_api_key
    from firetitan.local.null_engine import DEFAULT_BASE_MODEL

    try:
        api_key, _source = api_key_from(args)
    except ApiKeyError as exc:
        print(f"firetitan serve: {exc}", file=sys.stderr)
        return 2
    generated = not api_key
    if generated:
        api_key = generate_api_key()
    limits = {}
    if args.max_request_bytes is not None:
        limits["max_request_bytes"] = args.max_request_bytes
    try:
        trainer = LocalTrainer(
            args.engine,
            base_model=args.base_model or DEFAULT_BASE_MODEL,
            size=args.size,
            checkpoint_dir=args.checkpoint_dir,
            job_id=args.job_id,
            api_key=api_key,
            host=args.host,
            port=args.port,
            weights=args.weights,
            device=args.device,
            seed=args.seed,
            **limits,
        )
    except (ImportError, ValueError) as exc:
        print(f"firetitan serve: {exc}", file=sys.stderr)
        return 2

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with trainer:
            print(f"firetitan local trainer ({args.engine} engine) serving at {trainer.base_url}")
            print(f"job id: {trainer.job_id}; checkpoints under {trainer.checkpoint_dir}")
            if generated:
                print(f"API key (generated, shown once): {api_key}")
            sys.stdout.flush()
            await stop.wait()
            print("stopping: finishing in-flight work...", file=sys.stderr)
    except (OSError, ValueError) as exc:
        # What can fail at start: binding the address, an invalid job id, an unusable
        # checkpoint folder. Said in one line, not as a traceback.
        print(f"firetitan serve: cannot start: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    if not _is_loopback(args.host):
        print(
            f"WARNING: binding {args.host}: the deployment is reachable from other machines. "
            "Anyone with the API key can sample and hot-load; traffic is plain HTTP.",
            file=sys.stderr,
        )
    try:
        return asyncio.run(_deploy(args))
    except KeyboardInterrupt:
        return 130


async def _deploy(args: argparse.Namespace) -> int:
    root = Path(args.checkpoint_dir)
    if not await asyncio.to_thread(root.is_dir):  # said before the slow imports
        print(f"firetitan deploy: checkpoint folder {root} does not exist", file=sys.stderr)
        return 2
    from firetitan.local import generate_api_key
    from firetitan.local.deployment.launcher import READY_PREFIX

    try:
        from firetitan.local.deployment.server import DeploymentServer
        from firetitan.local.deployment.snapshots import SnapshotLoader
        from firetitan.local.torch.engine import pick_device
    except ImportError as exc:
        print(f"firetitan deploy: needs `pip install 'firetitan[local]'` ({exc})", file=sys.stderr)
        return 2
    try:
        api_key, _source = api_key_from(args)
    except ApiKeyError as exc:
        print(f"firetitan deploy: {exc}", file=sys.stderr)
        return 2
    generated = not api_key
    if generated:
        api_key = generate_api_key()
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
            loader, str(api_key), account=args.account, deployment_id=args.deployment_id
        )
    except (OSError, ValueError) as exc:
        print(f"firetitan deploy: cannot start: {exc}", file=sys.stderr)
        return 2

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            base_url = await server.start(args.host, args.port)
        except OSError as exc:
            print(f"firetitan deploy: cannot start: {exc}", file=sys.stderr)
            return 2
        print(f"deployment {server.model} of {args.base_model}; snapshots from {loader.root}")
        if generated:
            print(f"API key (generated, shown once): {api_key}")
        print(f"{READY_PREFIX}{base_url}")
        sys.stdout.flush()
        await stop.wait()
        print("stopping...", file=sys.stderr)
    finally:
        await server.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return demo_command.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
