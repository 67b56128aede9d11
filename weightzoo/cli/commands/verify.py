"""``weightzoo verify``: check every committed shard (size, layout, CRC32) and ledger file; ``--repair``
quarantines the bad ones so the next build retrains their ids."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from weightzoo.cli.commands.options import add_dataset
from weightzoo.errors import WeightzooError

HELP = "Check every committed shard and ledger file; --repair quarantines the bad ones."

if TYPE_CHECKING:
    from weightzoo.storage.verify import VerifyReport

EXIT_PROBLEMS = 1  # verify ran and found bad shards or ledger files (2 is a usage or storage error)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help=HELP
    )
    add_dataset(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="Move bad commit entries and unreadable ledger files to ledger/quarantine/ (their ids become pending).",
    )
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    p.set_defaults(func=run)


def _print_text(report: VerifyReport) -> None:
    print(f"{report.dataset}: checked {report.commits} commit entries and {report.failures} failure records")
    for p in report.problems:
        where = f"{p.shard} ({p.ledger_file})" if p.shard else p.ledger_file
        print(f"  BAD {where}: {p.reason}")
    for shard in report.uncommitted:
        print(f"  uncommitted {shard}: no commit entry points at it (never read; weightzoo gc collects it)")
    if report.card_rebuilt:
        print("rebuilt dataset_card.json from the recipe every commit entry records")
    if report.quarantined:
        ids = sum(p.ids for p in report.problems)
        print(f"quarantined {len(report.quarantined)} ledger file(s) under ledger/quarantine/; "
              f"{ids} id(s) are pending again: run weightzoo build to retrain them")
    elif report.problems:
        print(f"{len(report.problems)} problem(s): rerun with --repair to quarantine them")
    else:
        print("ok: every shard and ledger file matches")


def run(args: argparse.Namespace) -> int:
    from weightzoo.storage.verify import verify_dataset

    try:
        report = verify_dataset(args.dataset, repair=args.repair)
    except WeightzooError as e:
        print(f"weightzoo verify: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        _print_text(report)
    return 0 if report.ok else EXIT_PROBLEMS
