"""``weightzoo base``: make one of the offline base models the workloads train on, cached and seeded.

--kind world makes the tiny text-to-image base that draws the procedural world (tasks/world): the
only identity base whose pictures mean something. Its default settings' base ships with weightzoo and is
copied; other settings (or --rebuild) pretrain one. toy is the identity engine's tiny random-weights
pipeline of a model family (--family sd, sdxl, sd3 or flux: mechanics, benches, the GPU check); edit the
edit engine's small image-to-image base. --engine NAME makes any registered engine's toy base (a plugin's too).
A folder that already holds a base made with the same settings is kept, so reruns cost nothing.
"""

from __future__ import annotations

import argparse

HELP = "Make an offline base model: world (draws the procedural world), toy (random weights) or edit."
KINDS = ("world", "toy", "edit")


def register(sub: argparse._SubParsersAction) -> None:
    from weightzoo.tasks.identity.families import FAMILIES
    from weightzoo.tasks.world.config import WorldBaseSettings

    world = WorldBaseSettings()
    p = sub.add_parser("base", help=HELP, description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--kind", choices=KINDS, default=None, help="Which base (default world).")
    p.add_argument("--engine", default=None, metavar="NAME",
                   help="Make this registered engine's toy base instead of a --kind (toy is diffusers-lora's, "
                   "edit is edit-lora's).")
    p.add_argument("--family", choices=list(FAMILIES), default=None,
                   help="toy: model family of the tiny pipeline (default sd).")
    p.add_argument("--out", required=True, help="Folder for the base (a diffusers pipeline, or the edit base's files).")
    p.add_argument("--seed", type=int, default=world.seed, help="Seed of the initialisation and the training data.")
    p.add_argument("--steps", type=int, default=None,
                   help=f"Pretraining steps: world UNet + text encoder (default {world.steps}), edit (default 200); "
                   "toy is not trained.")
    p.add_argument("--vae-steps", type=int, default=world.vae_steps, help="world: VAE pretraining steps.")
    p.add_argument("--pool", type=int, default=world.pool, help="world: captioned renders to learn from.")
    p.add_argument("--rebuild", action="store_true",
                   help="world: pretrain even the default settings' base, which weightzoo ships and otherwise "
                   "copies (~20 CPU min; the shipped one was made on one thread: OMP_NUM_THREADS=1).")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    from weightzoo.errors import InputError

    if args.engine and args.kind:
        raise InputError("--kind and --engine both name the base to make: give one")
    for flag, value in (("--steps", args.steps), ("--vae-steps", args.vae_steps), ("--seed", args.seed)):
        if value is not None and value < 0:
            raise InputError(f"{flag} must not be negative, got {value}")
    if args.pool < 1:
        raise InputError(f"--pool must be at least 1, got {args.pool}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from weightzoo.cli.progress import Bar, terminal_progress
    from weightzoo.tasks.bases import make_base

    kind = args.engine or args.kind or "world"
    with terminal_progress(Bar("base", "steps", loss=True)):
        path, info = make_base(kind, args.out, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                               pool=args.pool, rebuild=args.rebuild, family=args.family)
    print(f"{kind}{'' if args.family is None else ' ' + args.family} base at {path}" + (f" ({info})" if info else ""))
    return 0
