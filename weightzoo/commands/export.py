"""``weightzoo export``: one dataset row → a diffusers-loadable LoRA ``.safetensors``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="Write one row of a dataset as a diffusers LoRA (.safetensors).")
    p.add_argument("--dataset", required=True, help="Dataset URI (local path or s3://bucket/prefix).")
    p.add_argument("--id", required=True, help="The row's id.")
    p.add_argument("--out", required=True, help="Output file, e.g. lora/pytorch_lora_weights.safetensors.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.finetune.export import export_lora

    ds = Dataset(args.dataset)
    meta, vector = ds.row(args.id)
    path = export_lora(vector, ds.layout, meta["hparams"], args.out)
    print(f"wrote {path} (id {args.id}, loss {meta['loss']}, method {meta['method']})")
    return 0
