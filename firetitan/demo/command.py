"""The ``firetitan demo`` subcommand: its arguments and what runs them.

Kept apart from ``firetitan/cli.py`` so that the command's options live next to the demo.
Importing it is cheap: the engine, matplotlib and tqdm load only when the demo runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from firetitan import DeploymentConfig, FiretitanError
from firetitan.demo import DemoConfig, DemoError, run_demo
from firetitan.demo.config import DEFAULT_BASE_MODEL

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to its subparser."""
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("firetitan-demo"),
        metavar="DIR",
        help="folder for metrics.jsonl, curves.png and summary.json (default: %(default)s)",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="run against this remote trainer instead of the embedded one",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="the remote trainer's key (default: $FIRETITAN_API_KEY, $FIREWORKS_API_KEY "
        "or $TINKER_API_KEY)",
    )
    parser.add_argument(
        "--base-model",
        default=DEFAULT_BASE_MODEL,
        metavar="NAME",
        help="model to train (default: %(default)s)",
    )
    parser.add_argument(
        "--deployment-url",
        default=None,
        metavar="URL",
        help="with --base-url: sample rollouts from this hot-load deployment (e.g. "
        "https://api.fireworks.ai), each export hot-loaded into it; needs --deployment-id",
    )
    parser.add_argument("--deployment-id", default=None, metavar="ID", help="the deployment's id")
    parser.add_argument(
        "--account",
        default=None,
        metavar="ID",
        help="the deployment's account (default: the one the API key belongs to)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="NAME",
        help="the model's tokenizer (a Hugging Face name or folder), if the trainer names none",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps of everything (a smoke test)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the demo as the options say; return the exit status."""
    if args.api_key and not args.base_url:
        print("firetitan demo: --api-key needs --base-url", file=sys.stderr)
        return 2
    if (args.deployment_url is None) != (args.deployment_id is None):
        print("firetitan demo: give both --deployment-url and --deployment-id", file=sys.stderr)
        return 2
    if args.deployment_url and not args.base_url:
        print(
            "firetitan demo: --deployment-url needs --base-url (the embedded trainer brings "
            "its own deployment)",
            file=sys.stderr,
        )
        return 2
    deployment = None
    if args.deployment_url:
        deployment = DeploymentConfig(
            base_url=args.deployment_url,
            deployment_id=args.deployment_id,
            account=args.account,
            tokenizer=args.tokenizer,
        )
    cfg = DemoConfig(
        out_dir=args.out,
        deployment=deployment,
        base_url=args.base_url,
        api_key=args.api_key,
        base_model=args.base_model,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.quick:
        cfg = cfg.quick()
    try:
        run_demo(cfg)
    except (DemoError, FiretitanError, OSError) as exc:
        print(f"firetitan demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
