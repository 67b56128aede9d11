"""``weightzoo invert``: one image → the model in the subspace that best reproduces it (w2w inversion)."""

from __future__ import annotations

import argparse

from weightzoo.cli.preview import add_preview, subspace_prompt, write_preview

HELP = "Invert one image into the subspace (optimise k coefficients) → a LoRA."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("invert", help=HELP)
    p.add_argument("--subspace", required=True, help="Subspace URI written by fit-subspace.")
    p.add_argument("--base", required=True, help="Base diffusers pipeline URI the dataset was trained on.")
    p.add_argument("--image", required=True, help="The image URI to invert.")
    p.add_argument("--mask", help="Optional mask image URI (white = fit, black = ignore), e.g. the face region.")
    p.add_argument("--prompt", help="Instance prompt (default: the first fitted row's prompt).")
    p.add_argument("--steps", type=int, default=200, help="Optimiser steps.")
    p.add_argument("--learning-rate", type=float, default=0.1, help="Adam learning rate in component-std units.")
    p.add_argument("--batch", type=int, default=4, help="Noise samples per step.")
    p.add_argument("--seed", type=int, default=0, help="Seed of timesteps and noise.")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', ...")
    p.add_argument("--out", required=True, help="Output .safetensors file (or a folder).")
    add_preview(p, takes_base=False)
    p.set_defaults(func=run)


def read_image(uri: str, flag: str):
    """The image at ``uri``, fully decoded; a missing or undecodable file is the user's error, named by ``flag``."""
    from PIL import UnidentifiedImageError

    from weightzoo.errors import InputError, NotFoundError, WeightzooError
    from weightzoo.tasks.finetune.images import load_image

    try:
        return load_image(uri)
    except WeightzooError:
        raise
    except FileNotFoundError:
        raise NotFoundError(f"{flag} not found at {uri}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{flag} {uri} does not decode as an image: {e}") from None


def check_pipeline(uri: str) -> None:
    """Refuse a --base that is no diffusers pipeline folder before anything loads."""
    from weightzoo.errors import NotFoundError
    from weightzoo.storage.fs import filesystem, join

    fs, path = filesystem(join(uri, "model_index.json"))
    if not fs.exists(path):
        raise NotFoundError(f"--base: no diffusers pipeline (model_index.json) at {uri}")


def check_numbers(args: argparse.Namespace) -> None:
    from weightzoo.errors import InputError

    if args.steps < 1 or args.batch < 1:
        raise InputError(f"--steps and --batch must be at least 1, got {args.steps} and {args.batch}")
    if args.learning_rate <= 0:
        raise InputError(f"--learning-rate must be positive, got {args.learning_rate}")


def run(args: argparse.Namespace) -> int:
    # Every input is checked, images decoded included, before the subspace and the base model load.
    check_numbers(args)
    image = read_image(args.image, "--image")
    mask = read_image(args.mask, "--mask") if args.mask else None
    check_pipeline(args.base)

    from weightzoo.cli.progress import Bar, terminal_progress
    from weightzoo.tasks.device import resolve_device
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.progress import report
    from weightzoo.tasks.subspace.pca import load_subspace
    from weightzoo.tasks.subspace.w2w import export, invert

    sub = load_subspace(args.subspace)
    prompt = args.prompt or subspace_prompt(sub)
    pipe = load_base(args.base, device=resolve_device(args.device))
    with terminal_progress(Bar("invert", "steps", loss=True)):
        inv = invert(sub, pipe, image, prompt, mask=mask, steps=args.steps, lr=args.learning_rate,
                     batch=args.batch, seed=args.seed, progress=report)
    path = export(sub, inv.weights, args.out)
    print(f"wrote {path}: loss on the image {inv.initial_loss:.4g} (mean model) → {inv.final_loss:.4g}")
    write_preview(args.base if args.preview else None, path, prompt)
    return 0
