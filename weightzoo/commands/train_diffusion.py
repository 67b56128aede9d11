"""``weightzoo train-diffusion``: train (or resume) a weight-diffusion model on a dataset."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-diffusion", help="Train a text-conditioned weight-diffusion model on a dataset's rows.")
    p.add_argument("--dataset", required=True, help="Dataset URI (local path or s3://bucket/prefix).")
    p.add_argument("--base", required=True, help="Base model URI (its text encoder embeds the condition).")
    p.add_argument("--out", required=True, help="Model folder URI; rerunning with the same folder resumes.")
    p.add_argument("--steps", type=int, default=2000, help="Total optimiser steps (default 2000).")
    p.add_argument("--block-size", type=int, default=256, help="Values per block (default 256).")
    p.add_argument("--batch-size", type=int, default=32, help="Models per step (default 32).")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3).")
    p.add_argument("--width", type=int, default=128, help="Denoiser width (default 128).")
    p.add_argument("--depth", type=int, default=3, help="Denoiser layers (default 3).")
    p.add_argument("--condition", choices=["prompt", "prompt+attributes"], default="prompt+attributes",
                   help="Condition text (default: the prompt followed by the row's attributes).")
    p.add_argument("--stats", help="Reuse mean/std from a subspace.safetensors (default: computed on training rows).")
    p.add_argument("--holdout-ids", nargs="*", default=[], metavar="ID", help="Ids never trained on.")
    p.add_argument("--holdout-fraction", type=float, default=0.0, help="Fraction held out at random (default 0).")
    p.add_argument("--split-seed", type=int, default=0, help="Seed of the random held-out choice.")
    p.add_argument("--seed", type=int, default=0, help="Training seed.")
    p.add_argument("--checkpoint-every", type=int, default=500, help="Steps between checkpoints (default 500).")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ... (default auto).")
    p.add_argument("--no-flow", action="store_true", help="Run in-process without Prefect (no UI, no artifacts).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weightzoo.tasks.diffusion.generator import WeightDiffusionConfig, train_weight_diffusion

    config = WeightDiffusionConfig(
        dataset=args.dataset, base=args.base, out=args.out, steps=args.steps, block_size=args.block_size,
        batch_size=args.batch_size, lr=args.lr, width=args.width, depth=args.depth, condition=args.condition,
        stats=args.stats, holdout_ids=tuple(args.holdout_ids), holdout_fraction=args.holdout_fraction,
        split_seed=args.split_seed, seed=args.seed, checkpoint_every=args.checkpoint_every, device=args.device,
    )
    if args.no_flow:
        result = train_weight_diffusion(config)
    else:
        from weightzoo.flows.train_weight_diffusion import train_weight_diffusion_flow

        result = train_weight_diffusion_flow(config)
    print(f"model {result.uri}: step {result.step} (resumed from {result.resumed_from}), loss {result.loss:.4g}, "
          f"{result.train_ids} rows trained on, {result.holdout_ids} held out")
    return 0
