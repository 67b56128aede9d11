"""``weightzoo status``: committed / failed / pending counts of a dataset."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="Show how much of a dataset is committed, failed and pending.")
    p.add_argument("--dataset", required=True, help="Dataset URI (local path or s3://bucket/prefix).")
    p.add_argument("--manifest", help="Manifest URI; with it, pending = manifest ids not yet committed.")
    p.add_argument("--json", action="store_true", help="Print JSON (integer counts, failure reasons).")
    p.add_argument("--limit", type=int, default=20, help="How many failures to list (default 20).")
    p.set_defaults(func=run)


def dataset_status(dataset: str, manifest: str | None = None) -> dict:
    """Counts (and failure reasons) for a dataset; ``pending`` only where a manifest is known."""
    from weightzoo.storage.ledger import Ledger

    ledger = Ledger(dataset)
    committed = ledger.committed_ids()
    failed = ledger.failed()
    out: dict = {
        "dataset": dataset,
        "committed": len(committed),
        "failed": len(failed),
        "shards": len(ledger.commits()),
        "failures": [{"id": f.id, "reason": f.reason, "attempt": f.attempt} for f in failed.values()],
    }
    if manifest:
        from weightzoo.tasks.finetune.manifest import read_manifest

        ids = [r.id for r in read_manifest(manifest)]
        out["total"] = len(ids)
        out["pending"] = len(ledger.pending(ids))
    return out


def run(args: argparse.Namespace) -> int:
    st = dataset_status(args.dataset, args.manifest)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    line = f"{st['dataset']}: {st['committed']} committed in {st['shards']} shards, {st['failed']} failed"
    if "pending" in st:
        line += f", {st['pending']} pending of {st['total']}"
    print(line)
    for f in st["failures"][: args.limit]:
        print(f"  failed {f['id']} (attempt {f['attempt']}): {f['reason']}")
    if len(st["failures"]) > args.limit:
        print(f"  ... and {len(st['failures']) - args.limit} more (--json lists all)")
    return 0
