"""The ``weightzoo`` command line. Each subcommand lives in ``weightzoo/cli/commands/<name>.py``.

A command module defines ``register(subparsers)``, which adds its parser and sets ``func``; heavy
imports (torch, diffusers, prefect) happen inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pydantic import ValidationError

from weightzoo.cli.commands.options import HELP_FORMATTER
from weightzoo.cli.quiet import quiet
from weightzoo.errors import WeightzooError

# Set before prefect/transformers are imported: no telemetry calls from a closed network, no noise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weightzoo never downloads; fail fast if anything tries

# Order is the order `weightzoo --help` lists them.
COMMANDS = ["demo", "build", "serve", "status", "verify", "gc", "files", "export", "merge", "publish", "train-diffusion", "generate", "fit-subspace", "sample", "edit", "invert", "project"]


class _Parser(argparse.ArgumentParser):
    """Every subcommand's parser: help states each flag's real default (weightzoo.cli.commands.options)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HELP_FORMATTER)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def _summary(module: object) -> str:
    """A command's one-line help: its module docstring's first sentence, without the ``weightzoo x``: prefix."""
    first = (getattr(module, "__doc__", "") or "").strip().split("\n")[0]
    return first.split(":", 1)[-1].strip().rstrip(".") if first.startswith("``") else first


def build_parser(command: str | None = None, full: bool = False) -> argparse.ArgumentParser:
    """The parser; only ``command``'s arguments are built (all with ``full``), since a command's flags come
    from its pydantic models, whose modules import torch: ``weightzoo --help`` stays fast."""
    parser = argparse.ArgumentParser(
        prog="weightzoo",
        description="Build datasets of fine-tuned LoRAs with Prefect, store them as Parquet, learn from them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Show third-party warnings and progress bars (quiet by default).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"weightzoo.cli.commands.{name.replace('-', '_')}")
        if full or name == command:
            module.register(sub)
        else:
            sub.add_parser(name, help=_summary(module), add_help=False)
    return parser


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):  # a model built from the user's flags refused them
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in exc.errors())
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    quiet(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (WeightzooError, ValidationError) as e:  # user errors: one line; anything else keeps its traceback
        print(f"weightzoo {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
