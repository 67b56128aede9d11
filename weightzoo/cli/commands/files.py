"""``weightzoo files``: the committed shard files and the ids visible in each, for tools outside Python.

A reader that globs ``shards/*.parquet`` would also read orphan shards and the losing copies of a
duplicate-commit race; this list is what to read instead (DuckDB, Spark, a shell loop, ...). It lists only
what ``weightzoo verify`` would accept: a shard that is missing, resized or of another layout than the
dataset's (``--verify``: also one whose bytes changed) stops it with one line naming the shard, or with
``--skip-bad`` is left out and named on stderr, as ``publish --skip-bad`` does. The layout it prints is read
from a listed file whose footer carries the dataset's layout, never from a file of another layout.
"""

from __future__ import annotations

import argparse
import json
import sys

from weightzoo.cli.commands.options import add_dataset

HELP = "List the committed shard files and the ids visible in each."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("files", help=HELP)
    add_dataset(p)
    p.add_argument("--json", action="store_true", help="Print JSON: each file's URI, ids, rows and bytes, then the layout.")
    p.add_argument("--verify", action="store_true",
                   help="Read every shard first (size, layout, CRC32, ids) and refuse to list a bad one.")
    p.add_argument("--skip-bad", action="store_true",
                   help="List only the shards that pass their check and name the rest on stderr; without it, "
                   "a bad shard stops the listing (exit 2).")
    p.set_defaults(func=run)


def listing(dataset: str, verify: bool = False, skip_bad: bool = False) -> dict:
    """The committed files (full URIs) that pass the check, the ids visible in each, the layout to decode
    ``weights`` with, and (``skip_bad``) the shards left out with why."""
    from weightzoo.errors import CorruptShardError, NotFoundError
    from weightzoo.storage.dataset import footer_layout, raise_bad, screen_files
    from weightzoo.storage.ledger import Ledger
    from weightzoo.storage.listing import committed_files

    ledger = Ledger(dataset)
    files = committed_files(ledger)
    if not files and not ledger.exists():
        raise NotFoundError(f"no dataset at {dataset}")
    bad = screen_files(ledger, files, verify)
    good = [f for f in files if f not in {b for b, _ in bad}]
    layout = None
    for f in list(good):  # the first good file whose footer has its entry's (the dataset's) layout
        try:
            layout = footer_layout(ledger.fs, f).to_dict()
            break
        except CorruptShardError as e:
            bad.append((f, str(e)))
            good.remove(f)
    if not skip_bad:
        raise_bad(bad, ", or list only the rest with weightzoo files --skip-bad")
    elif not good:
        raise_bad(bad, " (no shard passed its check: nothing to list)")
    return {  # the file list first, the (long) layout last: what a reader of the JSON wants first
        "dataset": dataset,
        "rows": sum(len(f.ids) for f in good),
        "files": [{"uri": f.uri, "shard": f.shard, "ids": list(f.ids), "rows": f.rows, "bytes": f.nbytes} for f in good],
        "left_out": [{"shard": f.shard, "ids": len(f.ids), "why": why} for f, why in bad],
        "layout": layout,
    }


def run(args: argparse.Namespace) -> int:
    out = listing(args.dataset, args.verify, args.skip_bad)
    for f in out["left_out"]:  # stderr: stdout stays the listing a tool parses
        print(f"weightzoo files: left out {f['shard']} ({f['ids']} ids): {f['why']}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for f in out["files"]:  # one line per file: URI, a tab, its visible ids comma-separated (ids never hold commas)
        print(f"{f['uri']}\t{','.join(f['ids'])}")
    return 0
