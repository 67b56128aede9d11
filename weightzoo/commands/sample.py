"""``weightzoo sample``: new models drawn from a subspace (weights2weights sampling) as diffusers LoRAs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="Sample new LoRAs from a fitted subspace (per-component Gaussians).")
    p.add_argument("--subspace", required=True, help="Subspace URI written by fit-subspace.")
    p.add_argument("--out", required=True, help="Folder (any URI) for sample-000.safetensors, sample-001, ...")
    p.add_argument("-n", "--num", type=int, default=1, help="How many models to sample.")
    p.add_argument("--seed", type=int, default=0, help="Random seed.")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="Scale of each component's std; below 1 stays nearer the mean model.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weightzoo.storage.fs import join
    from weightzoo.tasks.subspace.pca import load_subspace
    from weightzoo.tasks.subspace.w2w import export, sample

    if args.num < 1:
        raise ValueError("--num must be at least 1")
    sub = load_subspace(args.subspace)
    weights, _ = sample(sub, args.num, seed=args.seed, temperature=args.temperature)
    for i, w in enumerate(weights):
        print(f"wrote {export(sub, w, join(args.out, f'sample-{i:03d}.safetensors'))}")
    return 0
