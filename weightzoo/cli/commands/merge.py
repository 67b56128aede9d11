"""``weightzoo merge``: sum several LoRA rows of a dataset into one diffusers LoRA (exact, rank Σr).

Rows trained with ``method: orthogonal`` merge with little interference (each keeps its update on its
own input subspace); ``lora`` rows interfere (docs/RECIPES.md, "Merging").
"""

from __future__ import annotations

import argparse

from weightzoo.cli.commands.options import add_dataset

HELP = "Sum LoRA rows of a dataset into one diffusers LoRA file (orthogonal rows merge without interference)."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help=HELP)
    add_dataset(p)
    p.add_argument("--ids", required=True, nargs="+", metavar="ID", help="The rows to merge.")
    p.add_argument("--out", required=True,
                   help="Output file (…/pytorch_lora_weights.safetensors) or folder, for pipe.load_lora_weights.")
    p.add_argument("--scale", type=float, default=1.0, help="Multiplier of every row's update in the sum.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weightzoo.errors import InputError
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.finetune.export import export_merged
    from weightzoo.tasks.identity.recipes import NAMES

    if len(set(args.ids)) != len(args.ids):
        raise InputError(f"--ids repeats an id: {args.ids}")
    ds = Dataset(args.dataset)
    missing = [i for i in args.ids if i not in set(ds.ids)]
    if missing:
        raise InputError(f"ids not committed in {args.dataset}: {missing}")
    rows = [ds.row(i) for i in args.ids]
    methods = {meta["method"] for meta, _ in rows}
    not_lora = sorted(m for m in methods if m not in NAMES or not NAMES[m].lora_family)
    if not_lora:
        raise InputError(f"merge sums LoRA rows; these rows are {', '.join(not_lora)}")
    path = export_merged([(w, meta["hparams"]) for meta, w in rows], ds.layout, args.out,
                         [args.scale] * len(rows), args.ids)
    note = "" if methods == {"orthogonal"} else " (lora rows interfere when summed; orthogonal rows do not)"
    print(f"wrote {path}: {len(rows)} rows ({', '.join(sorted(methods))}) summed{note}")
    return 0
