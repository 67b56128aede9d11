"""``weightzoo status``: committed / failed / pending counts of a dataset, plus the cheap health checks
(commit entries whose shard is missing, quarantined ledger files). The CRC check is ``weightzoo verify``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from weightzoo.cli.commands.options import add_dataset

HELP = "Show how much of a dataset is committed, failed and pending."

if TYPE_CHECKING:  # storage imports pyarrow and torch: loaded only when the command runs
    from weightzoo.storage.ledger import CommitEntry, Ledger


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help=HELP)
    add_dataset(p)
    p.add_argument("--manifest", help="Manifest URI; with it, pending = manifest ids not yet committed.")
    p.add_argument("--json", action="store_true", help="Print JSON (integer counts, failure reasons).")
    p.add_argument("--limit", type=int, default=20, help="How many failures to list.")
    p.set_defaults(func=run)


def missing_shards(ledger: Ledger, commits: Sequence[CommitEntry]) -> list[dict]:
    """Commit entries whose shard file is absent: one listing of shards/ against the entries, no reads."""
    from weightzoo.storage.fs import join
    from weightzoo.storage.ledger import COMMITS, SHARDS

    path = join(ledger.root, SHARDS)
    ledger.fs.invalidate_cache(path)
    try:
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in ledger.fs.ls(path, detail=False)}
    except FileNotFoundError:
        present = set()
    return [
        {"shard": c.shard, "entry": f"{COMMITS}/{c.name}", "ids": len(c.ids)}
        for c in commits
        if c.shard.rsplit("/", 1)[-1] not in present
    ]


def dataset_status(dataset: str, manifest: str | None = None) -> dict:
    """Counts (and failure reasons) for a dataset; ``pending`` (neither committed nor failed) only where a
    manifest is known."""
    from weightzoo.errors import NotFoundError
    from weightzoo.storage.fs import redact
    from weightzoo.storage.health import batch_bytes, card_problems, storage_problems
    from weightzoo.storage.lease import lease_problems
    from weightzoo.storage.ledger import Ledger

    ledger = Ledger(dataset)
    if not ledger.exists():
        why = "; ".join(storage_problems(dataset))
        raise NotFoundError(f"no dataset at {redact(ledger.uri)}" + (f" ({why})" if why else ""))
    commits = ledger.commits()
    committed = {i for c in commits for i in c.ids}
    failed = ledger.failed()
    out: dict = {
        "dataset": dataset,
        "committed": len(committed),
        "failed": len(failed),
        "shards": len(commits),
        "failures": [{"id": f.id, "reason": f.reason, "attempt": f.attempt} for f in failed.values()],
        "missing_shards": missing_shards(ledger, commits),
        # What stops the next build from writing here (a build failing for it may not have recorded why).
        "storage": storage_problems(dataset, need_bytes=batch_bytes(c.nbytes for c in commits)) + card_problems(ledger),
        "quarantined": [{"path": q.path, "origin": q.origin, "reason": q.reason, "at": q.at} for q in ledger.quarantined()],
        # Leases whose expiry cannot be trusted (another host's clock): builds take them over, a person should know.
        "leases": lease_problems(ledger),
    }
    if manifest:
        from weightzoo.tasks.finetune.readers import read_manifest

        ids = [r.id for r in read_manifest(manifest)]
        out["total"] = len(ids)
        # Neither committed nor failed, so the three counts add up to the total as a build's summary does (a failed
        # id is listed as failed, not again as pending, whether or not the next build re-attempts it).
        out["pending"] = len(ledger.pending(ids, include_failed=False))
    return out


def _print_text(st: dict, limit: int) -> None:
    line = f"{st['dataset']}: {st['committed']} committed in {st['shards']} shards, {st['failed']} failed"
    if "pending" in st:
        line += f", {st['pending']} pending of {st['total']}"
    print(line)
    for f in st["failures"][:limit]:
        print(f"  failed {f['id']} (attempt {f['attempt']}): {f['reason']}")
    if len(st["failures"]) > limit:
        print(f"  ... and {len(st['failures']) - limit} more (--json lists all)")
    for m in st["missing_shards"]:
        print(f"  missing shard {m['shard']} ({m['ids']} ids, {m['entry']}): run weightzoo verify --repair")
    for problem in st["storage"]:
        print(f"  storage: {problem}")
    for q in st["quarantined"]:
        print(f"  quarantined {q['origin']} -> {q['path']}: {q['reason']}")
    for problem in st["leases"]:
        print(f"  {problem}")


EXIT_PROBLEMS = 1  # status ran and reports a problem: a missing shard, an unusable storage or card


def run(args: argparse.Namespace) -> int:
    st = dataset_status(args.dataset, args.manifest)  # no dataset, an unreadable ledger file: one-line errors
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        _print_text(st, args.limit)
    return EXIT_PROBLEMS if st["missing_shards"] or st["storage"] else 0
