"""``weightzoo edit``: move one model along an attribute direction of a subspace (weights2weights editing)."""

from __future__ import annotations

import argparse

from weightzoo.cli.preview import add_preview
from weightzoo.tasks.subspace.config import EDIT_STRENGTH, PROBE_STRENGTH, default_strength

HELP = "Edit a dataset row along an attribute direction (e.g. colour=red) → a LoRA."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help=HELP)
    p.add_argument("--subspace", required=True, help="Subspace URI written by fit-subspace.")
    p.add_argument("--list", action="store_true",
                   help="List the subspace's directions (labels, rows per label, cross-validated accuracy) and exit.")
    p.add_argument("--id", help="Row id to edit (read from the subspace's dataset).")
    p.add_argument("--attribute", help="Target label as NAME=VALUE, e.g. colour=red.")
    p.add_argument("--direction", choices=["labels", "probe"], default="labels",
                   help="labels (default): move by the average difference between rows of the row's label and "
                   "of the target, the other attributes held fixed; probe: along the attribute's probe direction.")
    # Defaults measured on world identities (tasks/subspace/config.py).
    p.add_argument("--strength", type=float, default=None,
                   help="How far (negative: away). labels: times the average difference (default "
                   f"{EDIT_STRENGTH:g}); probe: dataset standard deviations along the direction (default "
                   f"{PROBE_STRENGTH:g}).")
    p.add_argument("--disentangle", default="*",
                   help="Comma-separated attributes the edit keeps, e.g. shape,accessory (labels: fitted jointly with "
                   "the edited one, so held fixed; probe: their directions projected out); '*' (default): every "
                   "other attribute; '' none.")
    p.add_argument("--dataset", help="Dataset URI holding the row (default: the one the subspace was fitted on).")
    p.add_argument("--out", help="Output .safetensors file (or a folder).")
    add_preview(p)
    p.set_defaults(func=run)


def parse_attribute(text: str) -> tuple[str, str]:
    from weightzoo.errors import InputError

    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise InputError(f"--attribute must be NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _probe_line(p) -> str:
    counts = ", ".join(f"{v} {n}" for v, n in p.counts.items())
    acc = "n/a (too few rows)" if p.cv_accuracy != p.cv_accuracy else f"{p.cv_accuracy:.2f}"
    return (f"{p.attribute}: cross-validated accuracy {acc} (chance {p.chance:.2f}), {p.components} components, "
            f"ridge {p.penalty:g}; rows per label: {counts}")


def warnings_for(p, value: str) -> list[str]:
    """What makes an edit towards ``value`` untrustworthy: too few rows carry it, or the probe is no better
    than guessing (then the edit may change nothing visible)."""
    from weightzoo.tasks.subspace.probes import MIN_ROWS

    out = []
    if p.counts.get(value, 0) < MIN_ROWS:
        out.append(f"only {p.counts.get(value, 0)} of {sum(p.counts.values())} fitted rows are {p.attribute}={value} "
                   f"(fewer than {MIN_ROWS}): the direction is a guess")
    if not p.cv_accuracy >= p.chance + 0.1:
        out.append(f"the {p.attribute} probe predicts held-out rows no better than chance "
                   f"({p.cv_accuracy:.2f} vs {p.chance:.2f}): the edit may change nothing visible")
    return out


def run(args: argparse.Namespace) -> int:
    import sys

    from weightzoo.errors import InputError

    if args.list:
        from weightzoo.tasks.subspace.pca import load_subspace
        from weightzoo.tasks.subspace.w2w import probes

        found = probes(load_subspace(args.subspace))
        if not found:
            print("no directions: no attribute of the fitted rows has two labels or more")
        for p in found.values():
            print(_probe_line(p))
        return 0
    missing = [f for f in ("id", "attribute", "out") if not getattr(args, f)]
    if missing:
        raise InputError(f"edit needs {', '.join('--' + f for f in missing)} (or --list)")
    name, value = parse_attribute(args.attribute)
    from weightzoo.tasks.subspace.pca import load_subspace
    from weightzoo.tasks.subspace.w2w import (
        ALL_OTHERS,
        dataset_row,
        edit,
        edit_direction,
        edit_to_label,
        export,
        label_shift,
        predict_label,
        probes,
    )

    sub = load_subspace(args.subspace)
    others = ALL_OTHERS if args.disentangle.strip() == "*" else [
        a.strip() for a in args.disentangle.split(",") if a.strip()]
    try:
        d = edit_direction(sub, name, value, disentangle=others)
    except (KeyError, ValueError) as e:  # an attribute or label the fitted rows do not have
        raise InputError(str(e.args[0] if e.args else e)) from None
    probe = probes(sub)[name]
    print(_probe_line(probe))
    for line in warnings_for(probe, value):
        print(f"warning: {line}", file=sys.stderr)
    meta, x = dataset_row(sub, args.id, args.dataset)
    strength = default_strength(args.direction) if args.strength is None else args.strength
    if args.direction == "probe":
        edited, moved = edit(sub, x, d, strength), f"{strength:+g} std towards {name}={value}"
    else:
        current = dict(meta.get("attributes") or []).get(name) or predict_label(sub, x, name)
        if current == value:
            print(f"warning: {args.id} is already {name}={value}: the edit leaves it as it is", file=sys.stderr)
        try:
            shift = label_shift(sub, name, value, current, disentangle=others)
        except KeyError as e:  # a row label the fitted rows never carry
            raise InputError(f"{args.id}: {e.args[0]}") from None
        edited = edit_to_label(sub, x, shift, strength)
        moved = f"{strength:g} x the average {name}={current} -> {value} difference"
    path = export(sub, edited, args.out, meta["hparams"] or None)
    print(f"wrote {path} ({args.id} moved {moved})")
    if args.preview:
        from weightzoo.cli.preview import write_edit_preview

        write_edit_preview(args.preview, sub, meta, x, path, f"{name}={value}")
    return 0
