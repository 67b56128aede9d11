"""``weightzoo init``: write the best start the project knows for a new concept, from a trained weight generator.

The file is a diffusers LoRA: name it as a manifest row's ``init`` and ``weightzoo build`` starts that row's
training from it instead of the shared init (fewer steps to the same loss, where the generator's dataset
holds concepts like it). ``--start auto`` takes what the benches measured fastest: the k-nearest retrieval
of a residual generator, else the generated row (docs/WEIGHT_DIFFUSION.md "Starting a fine-tune").
"""

from __future__ import annotations

import argparse

from weightzoo.cli.commands.generate import _attr

HELP = "Write a start for a new concept's fine-tune from a weight generator (a LoRA file a manifest row's init names)."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help=HELP)
    p.add_argument("--model", required=True, help="Model folder written by `weightzoo train-diffusion`.")
    p.add_argument("--prompt", default="", help="The concept's prompt (text-conditioned models).")
    p.add_argument("--attr", type=_attr, action="append", default=[], metavar="KEY=VALUE",
                   help="An attribute of the concept, repeatable: --attr family=sepia --attr strength=0.7.")
    p.add_argument("--start", choices=("auto", "generated", "retrieved"), default="auto",
                   help="auto: the measured fastest (retrieved for a residual generator, else generated); "
                   "generated: the generator's output; retrieved: the k nearest training rows (residual_k > 0).")
    p.add_argument("--out", required=True, help="Output .safetensors file (or a folder for pytorch_lora_weights.safetensors).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the generated start's noise.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weightzoo.cli.commands.generate import check_args
    from weightzoo.tasks.diffusion.init import write_start

    args.steps = 1
    check_args(args)
    path, how = write_start(args.model, args.prompt, args.out, dict(args.attr), args.start, args.seed)
    print(f"wrote {path} ({how} start); use it as a manifest row's \"init\": {path}")
    return 0
