"""``weightzoo generate``: sample a LoRA from a weight-diffusion model folder and export it for diffusers."""

from __future__ import annotations

import argparse

from weightzoo.cli.preview import add_preview, write_preview

HELP = "Generate a LoRA from text with a weight-diffusion model (diffusers .safetensors)."


def _attr(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help=HELP)
    p.add_argument("--model", required=True, help="Model folder written by `weightzoo train-diffusion`.")
    p.add_argument("--prompt", required=True, help="The concept's prompt, e.g. 'sks person'.")
    p.add_argument("--attr", type=_attr, action="append", default=[], metavar="KEY=VALUE",
                   help="An attribute, for models trained with condition 'prompt+attributes' (repeatable).")
    p.add_argument("--out", required=True, help="Output file, e.g. lora/pytorch_lora_weights.safetensors.")
    p.add_argument("--steps", type=int, default=1, help="DDIM steps; 1 is the paper's one-step generation (the conditional mean).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the starting noise.")
    add_preview(p)
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Steps, and a model folder that holds a config and a checkpoint, before torch or the model loads."""
    from weightzoo.errors import InputError, NotFoundError
    from weightzoo.storage.fs import filesystem, join

    if args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    for name, what in (("config.json", "no weight-diffusion model (config.json)"),
                       ("checkpoints/latest.json", "no checkpoint (checkpoints/latest.json)")):
        fs, path = filesystem(join(args.model, name))
        if not fs.exists(path):
            raise NotFoundError(f"--model: {what} at {args.model}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    import sys

    from weightzoo.tasks.diffusion.generator import condition_warning, generate_lora

    path = generate_lora(args.model, args.prompt, args.out, dict(args.attr), steps=args.steps, seed=args.seed)
    print(f"wrote {path} ({args.steps} DDIM steps, seed {args.seed})")
    warning = condition_warning(args.model)
    if warning:
        print(warning, file=sys.stderr)
    write_preview(args.preview, path, args.prompt)
    return 0
