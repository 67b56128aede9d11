"""``weightzoo build``: run the build-dataset flow (validate, train what is not committed, report).

With no Prefect server configured, the flow runs against Prefect's ephemeral local API: no setup.
With ``PREFECT_API_URL`` set, its runs show in that server's UI; ``--executor deployment`` then
sends each batch to the finetune-batch deployment's workers (see ``weightzoo serve``).
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="Fine-tune every manifest row not yet committed in the dataset (resumable).")
    p.add_argument("--manifest", required=True, help="Manifest URI (jsonl/csv/parquet).")
    p.add_argument("--base", required=True, help="Base diffusers pipeline URI (local folder or s3://...).")
    p.add_argument("--dataset", required=True, help="Dataset URI (local folder or s3://bucket/prefix).")
    p.add_argument("--batch-size", type=int, default=None, help="Items per batch (one child run, one shard; default 64).")
    p.add_argument("--executor", choices=["local", "deployment"], default="local",
                   help="local: in this process (default); deployment: one deployment run per batch on a work pool.")
    p.add_argument("--deployment", default=None, help="'<flow>/<deployment>' for --executor deployment.")
    p.add_argument("--steps", type=int, default=None, help="Optimiser steps per item (default 800).")
    p.add_argument("--pack", type=int, default=None, help="Items trained together per step.")
    p.add_argument("--finetune-json", default=None,
                   help='More FinetuneConfig fields as JSON, e.g. \'{"rank": 2, "num_class_images": 50}\'.')
    p.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                   help="Re-attempt items whose last attempt failed (default: on).")
    p.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace):
    """The flow's ``BuildRequest`` from command-line arguments (unset flags keep the model's defaults)."""
    from weightzoo.flows.config import BuildRequest
    from weightzoo.tasks.finetune.engine import FinetuneConfig

    ft = json.loads(args.finetune_json) if args.finetune_json else {}
    ft |= {k: v for k, v in (("steps", args.steps), ("pack", args.pack)) if v is not None}
    fields = {"batch_size": args.batch_size, "deployment": args.deployment}
    return BuildRequest(manifest=args.manifest, base=args.base, dataset=args.dataset, executor=args.executor,
                        retry_failed=args.retry_failed, finetune=FinetuneConfig(**ft),
                        **{k: v for k, v in fields.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from weightzoo.commands.status import dataset_status
    from weightzoo.flows.build_dataset import build_dataset

    summary = build_dataset(build_request(args))
    status = dataset_status(args.dataset, args.manifest)
    if args.json:
        print(json.dumps({"summary": summary, "status": status}, indent=2))
    else:
        not_done = {b: s for b, s in summary["batches"].items() if s != "COMPLETED"}
        print(f"built {summary['dataset']}: {len(summary['batches'])} batch runs"
              + (f" ({len(not_done)} not completed)" if not_done else ""))
        print(f"committed {status['committed']}, failed {status['failed']}, pending {status.get('pending', '?')}"
              f" of {status.get('total', '?')} ({status['shards']} shards)")
        for f in status["failures"][:20]:
            print(f"  failed {f['id']} (attempt {f['attempt']}): {f['reason']}")
    return 0 if summary["pending"] == 0 and not summary["failed"] else 1
