"""``weightzoo train-diffusion``: train (or resume) a weight-diffusion model on a dataset."""

from __future__ import annotations

import argparse
import sys

HELP = "Train a text-conditioned weight-diffusion model on a dataset's rows."


FIELDS = ("steps", "block_size", "batch_size", "learning_rate", "lr_warmup_steps", "width", "depth", "heads", "condition", "residual_k", "form", "stats",
          "holdout_ids", "holdout_fraction", "split_seed", "seed", "checkpoint_every", "device", "mixed_precision",
          "objective", "task_weight", "task_pairs", "inner_steps", "inner_lr")


def register(sub: argparse._SubParsersAction) -> None:
    from weightzoo.cli.commands.options import add_field, add_fields
    from weightzoo.tasks.diffusion.config import WeightDiffusionConfig

    p = sub.add_parser("train-diffusion", help=HELP)
    for name in ("dataset", "base", "out"):
        add_field(p, WeightDiffusionConfig, name, required=True)
    add_fields(p, WeightDiffusionConfig, [f for f in FIELDS if f in WeightDiffusionConfig.model_fields])
    p.add_argument("--no-prefect", action="store_true", help="Run in this process without Prefect (no UI, no artifacts).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weightzoo.cli.commands.options import set_fields
    from weightzoo.cli.progress import Bar, terminal_progress
    from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
    from weightzoo.tasks.diffusion.generator import train_weight_diffusion
    from weightzoo.tasks.progress import report

    config = WeightDiffusionConfig(dataset=args.dataset, base=args.base, out=args.out, **set_fields(args, FIELDS))
    if args.no_prefect:
        with terminal_progress(Bar("train-diffusion", "steps", loss=True)):
            result = train_weight_diffusion(config, report)
    else:
        from weightzoo.flows.train_weight_diffusion import train_weight_diffusion_flow

        # The flow's training task runs in this process: its ThrottledProgress moves the bar.
        with terminal_progress(Bar("train-diffusion", "steps", loss=True)):
            result = train_weight_diffusion_flow(config)
    print(f"model {result.uri}: step {result.step} (resumed from {result.resumed_from}), loss {result.loss:.4g}, "
          f"{result.train_ids} rows trained on, {result.holdout_ids} held out")
    from weightzoo.tasks.diffusion.generator import condition_warning

    warning = condition_warning(result.uri)
    if warning:
        print(warning, file=sys.stderr)
    return 0
