"""``weightzoo publish``: the visible rows as a Hugging Face Hub-style dataset folder (local or s3://)."""

from __future__ import annotations

import argparse

from weightzoo.cli.commands.options import add_dataset

HELP = "Write the committed rows as a Hub-style dataset: data/train-*.parquet, layout.json, README.md."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish", help=HELP
    )
    add_dataset(p)
    p.add_argument("--out", required=True, help="Output folder (local path or s3://...); a rerun resumes it.")
    p.add_argument("--repo-id", metavar="ORG/NAME",
                   help="The Hub dataset this snapshot is for: the card's snippet loads it, and the command that "
                   "pushes the folder is printed. Without it the card names ORG/NAME, to replace.")
    p.add_argument("--max-file-mb", type=positive_int, default=512, help="Weights per output file, in MiB (at least 1).")
    p.add_argument(
        "--skip-bad", action="store_true",
        help="Publish only the rows of shards that pass their check (size, layout, CRC32, ids) and list the rest; "
        "without it, a bad shard stops the publish before anything is written.",
    )
    p.add_argument("--preview", metavar="BASE",
                   help="Also draw a preview grid per row (the first --preview-rows) with this base (a world base) "
                   "into OUT/previews/ and show them in the card.")
    p.add_argument("--preview-rows", type=positive_int, default=16, help="Rows given a preview grid.")
    p.set_defaults(func=run)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (0 or less would plan one output file per shard, or none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from weightzoo.storage.publish import publish

    r = publish(args.dataset, args.out, max_file_bytes=args.max_file_mb << 20, skip_bad=args.skip_bad,
                repo_id=args.repo_id)
    print(
        f"published {r.rows} rows to {r.out}: {len(r.files)} file(s), {len(r.written)} written, "
        f"{len(r.skipped)} already complete, {len(r.removed)} stale removed"
    )
    for shard, ids, why in r.left_out:
        print(f"  left out {shard} ({ids} ids): {why}")
    if args.repo_id is not None:
        from weightzoo.storage.publish import push_command

        if "://" in r.out:  # hf upload takes a local folder
            print(f"copy {r.out} to a local folder COPY, then push it: {push_command(args.repo_id, 'COPY')}")
        else:
            print(f"push it to the Hub: {push_command(args.repo_id, r.out)}")
    if args.preview:
        _previews(args)
    return 0


def _previews(args: argparse.Namespace) -> None:
    from weightzoo.tasks.world.previews import can_draw, card_previews

    if not can_draw(args.preview):
        print(f"no previews: {args.preview} is no world base (its pictures would be noise)")
        return
    grids = card_previews(args.preview, args.dataset, args.out, args.preview_rows)
    print(f"added {len(grids)} preview grid(s) to {args.out}/README.md (pictures in {args.out}/previews/)")
