"""``weightzoo edit``: move one model along an attribute direction of a subspace (weights2weights editing)."""

from __future__ import annotations

import argparse

from weightzoo.cli.preview import add_preview, write_preview

HELP = "Edit a dataset row along an attribute direction (e.g. colour=red) → a LoRA."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help=HELP)
    p.add_argument("--subspace", required=True, help="Subspace URI written by fit-subspace.")
    p.add_argument("--id", required=True, help="Row id to edit (read from the subspace's dataset).")
    p.add_argument("--attribute", required=True, help="Target label as NAME=VALUE, e.g. colour=red.")
    p.add_argument("--strength", type=float, default=1.0,
                   help="How far, in dataset standard deviations along the direction (negative: away).")
    p.add_argument("--disentangle", default="",
                   help="Comma-separated attributes whose directions are projected out first, e.g. shape,accessory.")
    p.add_argument("--dataset", help="Dataset URI holding the row (default: the one the subspace was fitted on).")
    p.add_argument("--out", required=True, help="Output .safetensors file (or a folder).")
    add_preview(p)
    p.set_defaults(func=run)


def parse_attribute(text: str) -> tuple[str, str]:
    from weightzoo.errors import InputError

    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise InputError(f"--attribute must be NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def run(args: argparse.Namespace) -> int:
    name, value = parse_attribute(args.attribute)
    from weightzoo.errors import InputError
    from weightzoo.tasks.subspace.pca import load_subspace
    from weightzoo.tasks.subspace.w2w import dataset_row, edit, edit_direction, export

    sub = load_subspace(args.subspace)
    others = [a.strip() for a in args.disentangle.split(",") if a.strip()]
    try:
        d = edit_direction(sub, name, value, disentangle=others)
    except (KeyError, ValueError) as e:  # an attribute or label the fitted rows do not have
        raise InputError(str(e.args[0] if e.args else e)) from None
    meta, x = dataset_row(sub, args.id, args.dataset)
    path = export(sub, edit(sub, x, d, args.strength), args.out, meta["hparams"] or None)
    print(f"wrote {path} ({args.id} moved {args.strength:+g} std towards {name}={value})")
    write_preview(args.preview, path, meta["prompt"])
    return 0
