"""``weightzoo build``: run the build-dataset flow (validate, train what is not committed, report).

With no Prefect server configured, the flow runs against Prefect's ephemeral local API: no setup.
With ``PREFECT_API_URL`` set, its runs show in that server's UI; ``--executor deployment`` then
sends each batch to the finetune-batch deployment's workers (see ``weightzoo serve``).
"""

from __future__ import annotations

import argparse
import json

BUILD_FIELDS = ("batch_size", "executor", "deployment", "engine", "retry_failed", "rounds", "cache_dir", "lease_ttl_s")
FINETUNE_FIELDS = ("method", "steps", "rank", "learning_rate", "pack")


def register(sub: argparse._SubParsersAction) -> None:
    from weightzoo.cli.commands.options import add_field, add_fields
    from weightzoo.flows.config import BuildConfig
    from weightzoo.tasks.finetune.config import FinetuneConfig

    p = sub.add_parser("build", help="Fine-tune every manifest row not yet committed in the dataset (resumable).")
    for name in ("manifest", "base", "dataset"):
        add_field(p, BuildConfig, name, required=True)
    add_fields(p, BuildConfig, [f for f in BUILD_FIELDS if f in BuildConfig.model_fields])
    ft = p.add_argument_group("fine-tune (FinetuneConfig; any other field through --finetune-json)")
    add_fields(ft, FinetuneConfig, FINETUNE_FIELDS)
    ft.add_argument("--finetune-json", default=None,
                    help='More FinetuneConfig fields as JSON, e.g. \'{"alpha": 8, "num_class_images": 50}\'.')
    p.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    p.set_defaults(func=run)


def build_request(args: argparse.Namespace):
    """The flow's ``BuildConfig`` from the flags the user set (the models supply every other default)."""
    from weightzoo.cli.commands.options import set_fields
    from weightzoo.errors import InputError
    from weightzoo.flows.config import BuildConfig
    from weightzoo.tasks.finetune import engines

    try:
        ft = json.loads(args.finetune_json) if args.finetune_json else {}
    except json.JSONDecodeError as e:
        raise InputError(f"--finetune-json is not valid JSON: {e}") from e
    ft |= set_fields(args, FINETUNE_FIELDS)
    fields = set_fields(args, BUILD_FIELDS)
    config = engines.get(fields.get("engine", engines.DEFAULT_ENGINE)).config  # each engine's own settings
    return BuildConfig(manifest=args.manifest, base=args.base, dataset=args.dataset, finetune=config(**ft), **fields)


def run(args: argparse.Namespace) -> int:
    from weightzoo.cli.commands.status import dataset_status
    from weightzoo.cli.progress import Bar, terminal_progress
    from weightzoo.flows.build_dataset import build_dataset
    from weightzoo.tasks.progress import COMMITTED

    request = build_request(args)
    # In-process batches (the local executor) move the batch bar; every executor moves the committed one.
    steps = int(getattr(request.finetune, "steps", 0) or 0)  # every engine's config has steps; 0 hides the items
    with terminal_progress(Bar("batch", "row-steps", steps_per_item=steps),
                           Bar("committed", "ids", name=COMMITTED)):
        summary = build_dataset(request)
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
