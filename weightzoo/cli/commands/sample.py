"""``weightzoo sample``: new models drawn from a subspace (weights2weights sampling) as diffusers LoRAs.

Each sample is a folder holding ``pytorch_lora_weights.safetensors``, the name diffusers looks for, so
``pipe.load_lora_weights("<out>/sample-000")`` loads it as it is.
"""

from __future__ import annotations

import argparse

from weightzoo.cli.preview import add_preview, subspace_prompt, write_preview
from weightzoo.tasks.subspace.config import SAMPLE_TEMPERATURE

HELP = "Sample new LoRAs from a fitted subspace (per-component Gaussians)."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help=HELP)
    p.add_argument("--subspace", required=True, help="Subspace URI written by fit-subspace.")
    p.add_argument("--out", required=True,
                   help="Folder (any URI) for sample-000/, sample-001/, ..., each with pytorch_lora_weights.safetensors.")
    p.add_argument("-n", "--num", type=int, default=1, help="How many models to sample.")
    p.add_argument("--seed", type=int, default=0, help="Random seed.")
    p.add_argument("--temperature", type=float, default=SAMPLE_TEMPERATURE,
                   help="Scale of each component's std (1: weights2weights' draw); below 1 stays nearer the mean "
                   "model, where more samples draw a subject.")
    add_preview(p)
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    from weightzoo.errors import InputError
    from weightzoo.storage.fs import filesystem

    if args.num < 1:
        raise InputError(f"--num must be at least 1, got {args.num}")
    if args.temperature < 0:
        raise InputError(f"--temperature must not be negative, got {args.temperature}")
    fs, path = filesystem(args.out)
    if fs.isfile(path):
        raise InputError(f"--out {args.out} is a file; sample writes a folder of sample-NNN/ folders")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from weightzoo.storage.fs import join
    from weightzoo.tasks.subspace.pca import load_subspace
    from weightzoo.tasks.subspace.w2w import export, sample

    sub = load_subspace(args.subspace)
    weights, _ = sample(sub, args.num, seed=args.seed, temperature=args.temperature)
    for i, w in enumerate(weights):
        path = export(sub, w, join(args.out, f"sample-{i:03d}"))
        print(f"wrote {path}")
        write_preview(args.preview, path, subspace_prompt(sub))
    return 0
