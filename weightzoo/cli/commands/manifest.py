"""``weightzoo manifest --from-folder DIR --out M``: a folder of captioned subject folders → a manifest."""

from __future__ import annotations

import argparse

HELP = "Write a manifest from a folder of subject folders whose images are captioned (kohya .txt or metadata.jsonl)."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifest", help=HELP, description=HELP + " Each subfolder is one row; an image's caption "
                       "is its same-named .txt or its metadata.jsonl line; attributes.json holds the row's labels; "
                       "a kohya name '<repeats>_<token> <class>' gives the prompt and class prompt (docs/MANIFEST.md).")
    p.add_argument("--from-folder", required=True, help="Folder (local or s3://...) of one subfolder per subject.")
    p.add_argument("--out", required=True, help="Manifest file to write (.jsonl).")
    p.add_argument("--prompt", default="sks person",
                   help="Instance prompt of folders not named '<repeats>_<token> <class>'.")
    p.add_argument("--class-prompt", default="person", help="Class prompt of those folders.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weightzoo.cli.paths import absolute
    from weightzoo.errors import InputError
    from weightzoo.tasks.finetune.folders import rows_from_folder
    from weightzoo.tasks.finetune.readers import write_manifest

    if not args.out.endswith(".jsonl"):
        raise InputError(f"--out {args.out}: the manifest is written as JSON lines; name it *.jsonl")
    rows = rows_from_folder(absolute(args.from_folder), args.prompt, args.class_prompt)
    out = write_manifest(rows, args.out)
    print(f"{len(rows)} rows, {sum(len(r.images) for r in rows)} captioned images → {out}")
    return 0
