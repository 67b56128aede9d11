"""The ``weightzoo`` command line. Each subcommand lives in ``weightzoo/commands/<name>.py``.

A command module defines ``register(subparsers)``, which adds its parser and sets ``func``; heavy
imports (torch, diffusers, prefect) happen inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order `weightzoo --help` lists them.
COMMANDS = ["demo", "build", "serve", "status", "export", "train-diffusion", "generate", "fit-subspace", "sample", "edit", "invert", "project"]


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
