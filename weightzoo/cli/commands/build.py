"""``weightzoo build``: run the build-dataset flow (validate, train what is not committed, report).

With no Prefect server configured, the flow runs against Prefect's ephemeral local API: no setup.
With ``PREFECT_API_URL`` set, its runs show in that server's UI; ``--executor deployment`` then
sends each batch to the finetune-batch deployment's workers (see ``weightzoo serve``).
The fine-tune flags are the chosen engine's config fields: ``--engine edit-lora --help`` shows its defaults.
"""

from __future__ import annotations

import argparse
import json

BUILD_FIELDS = ("batch_size", "executor", "deployment", "engine", "retry_failed", "rounds", "cache_dir", "lease_ttl_s")
FINETUNE_FIELDS = ("method", "steps", "rank", "learning_rate", "pack")
SHOWN_FAILURES = 20


def register(sub: argparse._SubParsersAction) -> None:
    from weightzoo.cli.commands.options import add_engine_fields, add_field, add_fields
    from weightzoo.flows.config import BuildConfig

    p = sub.add_parser("build", help="Fine-tune every manifest row not yet committed in the dataset (resumable).")
    for name in ("manifest", "base", "dataset"):
        add_field(p, BuildConfig, name, required=True)
    add_fields(p, BuildConfig, [f for f in BUILD_FIELDS if f in BuildConfig.model_fields and f != "engine"])
    ft = p.add_argument_group("fine-tune (the engine's config; any other field through --finetune-json)")
    add_engine_fields(p, ft, BuildConfig, FINETUNE_FIELDS)
    ft.add_argument("--finetune-json", default=None,
                    help='More fields of the engine\'s config as JSON, e.g. \'{"alpha": 8, "num_class_images": 50}\'.')
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


def run_build(request) -> dict:
    """The build's summary, complete or not (an incomplete build's flow run ends Failed with the same summary);
    any other failure (a rejected manifest, another recipe) raises."""
    from weightzoo.flows.build_dataset import BuildIncomplete, build_dataset

    state = build_dataset(request, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BuildIncomplete):
        return result.summary
    if isinstance(result, BaseException):
        raise result
    return result


def _print_summary(summary: dict) -> None:
    """Counts, then each batch run that did not complete and each failed item, with their reasons."""
    bad = summary["batch_failures"]
    print(f"built {summary['dataset']}: {len(summary['batches'])} batch runs"
          + (f" ({len(bad)} not completed)" if bad else ""))
    print(f"committed {summary['committed']}, failed {summary['failed']}, pending {summary['pending']}"
          f" of {summary['total']} ({summary['shards']} shards)")
    for b in bad:
        print(f"  batch {b['batch']} {b['state']}: {b['reason']}")
    for f in summary["failures"][:SHOWN_FAILURES]:
        print(f"  failed {f['id']} (attempt {f['attempt']}): {f['reason']}")
    if len(summary["failures"]) > SHOWN_FAILURES:
        print(f"  ... and {len(summary['failures']) - SHOWN_FAILURES} more (--json lists all)")


def run(args: argparse.Namespace) -> int:
    from weightzoo.cli.progress import Bar, terminal_progress
    from weightzoo.tasks.progress import COMMITTED

    request = build_request(args)
    # In-process batches (the local executor) move the batch bar; every executor moves the committed one.
    steps = int(getattr(request.finetune, "steps", 0) or 0)  # every engine's config has steps; 0 hides the items
    with terminal_progress(Bar("batch", "row-steps", steps_per_item=steps),
                           Bar("committed", "ids", name=COMMITTED)):
        summary = run_build(request)
    if args.json:
        print(json.dumps({"summary": summary}, indent=2))
    else:
        _print_summary(summary)
    return 0 if summary["committed"] == summary["total"] else 1
