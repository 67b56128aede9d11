"""``weightzoo files``: the committed shard files and the ids visible in each, for tools outside Python.

A reader that globs ``shards/*.parquet`` would also read orphan shards and the losing copies of a
duplicate-commit race; this list is what to read instead (DuckDB, Spark, a shell loop, ...).
"""

from __future__ import annotations

import argparse
import json

from weightzoo.cli.commands.options import add_dataset

HELP = "List the committed shard files and the ids visible in each."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("files", help=HELP)
    add_dataset(p)
    p.add_argument("--json", action="store_true", help="Print JSON: each file's URI, ids, rows and bytes, then the layout.")
    p.add_argument("--verify", action="store_true",
                   help="Read every shard first (size, layout, CRC32, ids) and refuse to list a bad one.")
    p.set_defaults(func=run)


def listing(dataset: str, verify: bool = False) -> dict:
    """The committed files (full URIs), the ids visible in each, and the layout to decode ``weights`` with."""
    from weightzoo.errors import NotFoundError
    from weightzoo.storage.dataset import check_files, raise_bad
    from weightzoo.storage.fs import filesystem
    from weightzoo.storage.listing import committed_files
    from weightzoo.storage.shards import read_layout

    fs, root = filesystem(dataset)
    files = committed_files(dataset)
    if not files and not fs.exists(root):
        raise NotFoundError(f"no dataset at {dataset}")
    if verify:
        raise_bad(check_files(fs, files))
    layout = read_layout(fs, files[0].path).to_dict() if files else None
    return {  # the file list first, the (long) layout last: what a reader of the JSON wants first
        "dataset": dataset,
        "rows": sum(len(f.ids) for f in files),
        "files": [{"uri": f.uri, "shard": f.shard, "ids": list(f.ids), "rows": f.rows, "bytes": f.nbytes} for f in files],
        "layout": layout,
    }


def run(args: argparse.Namespace) -> int:
    out = listing(args.dataset, args.verify)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for f in out["files"]:  # one line per file: URI, a tab, its visible ids comma-separated (ids never hold commas)
        print(f"{f['uri']}\t{','.join(f['ids'])}")
    return 0
