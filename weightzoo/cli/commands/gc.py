"""``weightzoo gc``: list (dry run) or delete a dataset's orphan shards (shards no commit points at) and
stale temp files (``shards/_tmp/``, left by killed writers)."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta

from weightzoo.cli.commands.options import add_dataset

HELP = "Remove orphan shards (written but never committed) and stale temp files; a dry run by default."


_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    """``30m``, ``1h``, ``2d``, ``0s`` → a timedelta (argparse type; a bad value is a usage error)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 1h, 2d or 0s")
    return timedelta(**{_UNITS[m[2]]: float(m[1])})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gc", help=HELP)
    add_dataset(p)
    p.add_argument(
        "--older-than",
        type=parse_duration,
        default=timedelta(hours=1),
        metavar="DURATION",
        help="Grace period: newer uncommitted shards and temp files may belong to a batch in flight.",
    )
    p.add_argument("--delete", action="store_true", help="Delete them (without it, only list them).")
    p.set_defaults(func=run)


def _human(nbytes: int) -> str:
    size, units = float(nbytes), ["B", "KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{size:.1f} {units[0]}"


def run(args: argparse.Namespace) -> int:
    from weightzoo.storage.gc import collect

    if args.delete and args.older_than == timedelta(0):
        print("warning: --older-than 0s: shards of batches still running may be deleted", file=sys.stderr)
    r = collect(args.dataset, args.older_than, delete=args.delete)
    n, t = len(r.orphans), len(r.temps)
    verb = "removed" if r.deleted else "would remove"
    print(
        f"{r.dataset}: {verb} {n} orphan shard{'s' * (n != 1)} and {t} stale temp file{'s' * (t != 1)}, "
        f"{r.nbytes} bytes ({_human(r.nbytes)}), older than {r.older_than}"
    )
    for o in r.orphans + r.temps:
        print(f"  {o.path}  {o.size} bytes  modified {o.mtime.isoformat(timespec='seconds')}")
    if r.recent:
        print(f"  kept {r.recent} uncommitted file(s) newer than {r.older_than} (may be about to commit)")
    if r.leased:
        print(f"  kept {r.leased} uncommitted file(s) of batches a live build holds the lease of")
    for path, why in r.skipped:
        print(f"  skipped {path}: {why}")
    if (n or t) and not r.deleted:
        print("dry run: nothing deleted; rerun with --delete to remove them")
    return 0
