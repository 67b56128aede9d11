"""The ``weightzoo`` command line. Each subcommand lives in ``weightzoo/commands/<name>.py``.

A command module defines ``register(subparsers)``, which adds its parser and sets ``func``; heavy
imports (torch, diffusers, prefect) happen inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Set before prefect/transformers are imported: no telemetry calls from a closed network, no noise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weightzoo never downloads; fail fast if anything tries

# Order is the order `weightzoo --help` lists them.
COMMANDS = ["demo", "build", "serve", "status", "gc", "export", "train-diffusion", "generate", "fit-subspace", "sample", "edit", "invert", "project"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightzoo",
        description="Build datasets of fine-tuned LoRAs with Prefect, store them as Parquet, learn from them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"weightzoo.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, KeyError) as e:  # user errors: one clear line, no traceback
        print(f"weightzoo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
