"""``weightzoo export``: one dataset row → a diffusers LoRA ``.safetensors`` (default) or a peft adapter folder."""

from __future__ import annotations

import argparse

from weightzoo.cli.commands.options import add_dataset

HELP = "Write one row of a dataset as a diffusers LoRA file or a peft adapter folder."


FORMATS = ("diffusers", "peft")  # the same as tasks/finetune/export.py's; kept here so --help imports nothing heavy


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=HELP)
    add_dataset(p)
    p.add_argument("--id", required=True, help="The row's id.")
    p.add_argument(
        "--out",
        required=True,
        help="diffusers: output file (…/pytorch_lora_weights.safetensors) or folder; peft: output folder.",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="diffusers",
        help="diffusers (default): unet.-prefixed keys, alpha/rank baked into lora_B, for pipe.load_lora_weights; "
        "peft: adapter_config.json + adapter_model.safetensors (unscaled, lora_alpha = alpha) for PeftModel.from_pretrained.",
    )
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """The dataset exists and --out fits the format, before any shard is read."""
    from weightzoo.errors import InputError, NotFoundError
    from weightzoo.storage.ledger import Ledger

    if args.format == "peft" and str(args.out).endswith(".safetensors"):
        raise InputError(f"--format peft writes a folder (adapter_config.json + adapter_model.safetensors), "
                         f"not the file {args.out}")
    if not Ledger(args.dataset).exists():
        raise NotFoundError(f"dataset not found at {args.dataset}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    from weightzoo.errors import NotFoundError
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.finetune.export import base_name, export

    ds = Dataset(args.dataset)
    try:
        meta, vector = ds.row(args.id)
    except KeyError:
        raise NotFoundError(f"id {args.id!r} is not committed in {args.dataset}") from None
    base = base_name(args.dataset, meta["base_model"]) if args.format == "peft" else None  # peft's config names it
    path = export(vector, ds.layout, meta["hparams"], args.out, args.format, base=base)
    loss = "?" if meta["loss"] is None else f"{meta['loss']:.4g}"
    print(f"wrote {path} ({args.format}; id {args.id}, loss {loss}, method {meta['method']})")
    return 0
