"""``weightzoo build``: run the build-dataset flow (validate, train what is not committed, report).

With no Prefect server configured, the flow runs against Prefect's ephemeral local API: no setup.
With ``PREFECT_API_URL`` set, its runs show in that server's UI; ``--executor deployment`` then
sends each batch to the finetune-batch deployment's workers (see ``weightzoo serve``).
The fine-tune flags are the chosen engine's config fields: ``--engine edit-lora --help`` shows its defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "Fine-tune every manifest row not yet committed in the dataset (resumable)."


BUILD_FIELDS = ("batch_size", "executor", "deployment", "engine", "retry_failed", "rounds", "cache_dir", "lease_ttl_s",
                "report_to", "logging_dir")
FINETUNE_FIELDS = ("method", "steps", "rank", "learning_rate", "pack")
SHOWN_FAILURES = 20


def register(sub: argparse._SubParsersAction) -> None:
    from weightzoo.cli.commands.options import add_engine_fields, add_field, add_fields
    from weightzoo.flows.config import BuildConfig

    p = sub.add_parser("build", help=HELP)
    for name in ("manifest", "base", "dataset"):
        add_field(p, BuildConfig, name, required=True)
    add_fields(p, BuildConfig, [f for f in BUILD_FIELDS if f in BuildConfig.model_fields and f != "engine"])
    ft = p.add_argument_group("fine-tune (the engine's config; any other field through --finetune-json)")
    add_engine_fields(p, ft, BuildConfig, FINETUNE_FIELDS)
    ft.add_argument("--finetune-json", default=None,
                    help='More fields of the engine\'s config as JSON, e.g. \'{"alpha": 8, "num_class_images": 50}\'.')
    p.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    p.set_defaults(func=run)
    add_plan_flags(p)


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
    if not isinstance(ft, dict):
        raise InputError(f"--finetune-json must be a JSON object of the engine's config fields, got {type(ft).__name__}")
    ft |= set_fields(args, FINETUNE_FIELDS)
    fields = set_fields(args, BUILD_FIELDS)
    if "logging_dir" in fields:  # a config field must be absolute (a run may start in another folder)
        from weightzoo.cli.paths import absolute

        fields["logging_dir"] = absolute(fields["logging_dir"])
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


def build_bars(request: Any) -> tuple:
    """The build's terminal bars: in-process batches (the local executor) move the batch bar, with the running
    loss the driver reports; every executor moves the committed one."""
    from weightzoo.cli.progress import Bar
    from weightzoo.tasks.progress import COMMITTED

    steps = int(getattr(request.finetune, "steps", 0) or 0)  # every engine's config has steps; 0 hides the items
    return Bar("batch", "row-steps", steps_per_item=steps, loss=True), Bar("committed", "ids", name=COMMITTED)


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
    from weightzoo.cli.progress import terminal_progress

    settings_from_config(args)
    check_build(args)
    request = build_request(args)
    if args.dry_run:
        return print_plan(request, args.json)
    with terminal_progress(*build_bars(request)):
        summary = run_build(request)
    if args.json:
        print(json.dumps({"summary": summary}, indent=2))
    else:
        _print_summary(summary)
    return 0 if summary["committed"] == summary["total"] else 1


# --- checks, --config, --dry-run: before any server, model or folder is made -----------------------------

REQUIRED = ("manifest", "base", "dataset")  # required as flags or in --config
NOT_SETTINGS = {"help", "config", "dry_run", "json", "verbose", "quiet", "log_format", "func"}


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` (the flags' settings from TOML or YAML; flags override) and ``--dry-run``."""
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML or YAML file of the same settings as the flags (manifest, base, dataset, batch_size, "
                   "..., and a [finetune] table); flags given as well override it.")
    p.add_argument("--dry-run", action="store_true",
                   help="Print the resolved plan (paths, recipe and fingerprint, batches, what is committed) and exit "
                   "without creating anything.")
    for action in p._actions:
        if action.dest in REQUIRED:
            action.required = False  # checked after --config is read (check_build)
            action.help = f"{action.help} Required, as a flag or in --config."
    p.set_defaults(settings=sorted({a.dest for a in p._actions} - NOT_SETTINGS))


def _parse(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


def read_settings(uri: str) -> dict[str, Any]:
    """The settings in a ``.toml``, ``.yaml`` or ``.yml`` file; a bad file is the user's error."""
    from weightzoo.cli.paths import existing_file
    from weightzoo.errors import InputError

    existing_file(uri, "--config")
    suffix = Path(uri).suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise InputError(f"--config {uri}: expected a .toml, .yaml or .yml file")
    try:
        data = _parse(Path(uri).read_text(), suffix)
    except ValueError as e:
        raise InputError(f"--config {uri} does not parse: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {uri}: expected a table of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _fill(args: argparse.Namespace, settings: dict[str, Any], known: list[str] | None) -> None:
    """Set each unset flag from ``settings``; a key not in ``known`` is refused (None: skipped)."""
    import difflib

    from weightzoo.cli.paths import PATH_DESTS, absolute, is_uri
    from weightzoo.errors import InputError

    for key, value in settings.items():
        if known is not None and key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise InputError(f"--config {args.config}: unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        if key in PATH_DESTS and isinstance(value, str) and not is_uri(value):
            value = absolute(str(Path(args.config).parent / Path(value).expanduser()))  # against the file's folder
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)


def settings_from_config(args: argparse.Namespace) -> None:
    """Fill every flag the user did not set from ``--config``; its ``finetune`` table goes under
    ``--finetune-json`` (whose own keys win). Paths in the file are taken against the file's folder."""
    from weightzoo.errors import InputError

    if not args.config:
        return
    settings = read_settings(args.config)
    finetune = settings.pop("finetune", {}) or {}
    _fill(args, settings, args.settings)
    if finetune:
        if not isinstance(finetune, dict):
            raise InputError(f"--config {args.config}: 'finetune' must be a table of the engine's config fields")
        args.finetune_json = json.dumps({**finetune, **json.loads(args.finetune_json or "{}")})


def precheck(argv: list[str]) -> None:
    """The input checks from a parser of the path flags alone, before the full parser imports the config
    models (and torch with them): a wrong path, base or engine is answered at once. Whatever this parser
    cannot tell (a typo, a missing flag) is left to the full one."""
    from weightzoo.cli.paths import absolute_paths

    if {"-h", "--help"} & set(argv):
        return
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in (*REQUIRED, "engine", "config"):
        p.add_argument(f"--{name}")
    args, _ = p.parse_known_args(argv)
    absolute_paths(args)
    if args.config:
        _fill(args, read_settings(args.config), None)
    if all(getattr(args, name) for name in REQUIRED):
        from weightzoo.cli.paths import flag_of
        from weightzoo.flows.build_checks import check_inputs

        check_inputs(args.manifest, args.base, args.dataset, args.engine, name=flag_of)


def check_build(args: argparse.Namespace) -> None:
    """Every mistake a user can make in the flags, in about a second: nothing is made before these pass
    (the build flow runs the same checks again, for the builds the CLI does not start)."""
    from weightzoo.cli.paths import flag_of
    from weightzoo.errors import InputError
    from weightzoo.flows.build_checks import check_inputs
    from weightzoo.tasks.finetune.tracking import check_report_to

    missing = [flag_of(name) for name in REQUIRED if not getattr(args, name, None)]
    if missing:
        raise InputError(f"the following arguments are required (as flags or in --config): {', '.join(missing)}")
    check_inputs(args.manifest, args.base, args.dataset, args.engine, name=flag_of)
    check_report_to(getattr(args, "report_to", None) or "none", "--report-to")


def print_plan(request: Any, as_json: bool) -> int:
    """``--dry-run``: the plan (``build_checks.plan_of``), and nothing created (the dataset is only read)."""
    from weightzoo.flows.build_checks import plan_of

    plan = plan_of(request)
    if as_json:
        print(json.dumps(plan, indent=2))
        return 0
    cfg, recipe = plan["config"], plan["recipe"]
    print(f"dry run: nothing trained, nothing written\n  manifest  {cfg['manifest']}\n  base      {cfg['base']}\n"
          f"  dataset   {cfg['dataset']}" + ("" if plan["dataset_exists"] else " (new)"))
    method = cfg["finetune"].get("method", "-")  # every built-in engine's config has one; a plugin's may not
    print(f"  recipe    engine {recipe['engine']}, method {method}, base {recipe['base_fingerprint']}, "
          f"config {recipe['config_fingerprint']}")
    print(f"  ids       {plan['manifest_ids']} in the manifest, {plan['committed']} committed, "
          f"{len(plan['to_train'])} to train in {len(plan['batches'])} batch(es) of up to {cfg['batch_size']} "
          f"({cfg['executor']} executor)")
    for b in plan["batches"][:20]:
        print(f"    {b['batch_id']}: {', '.join(b['ids'])}")
    if len(plan["batches"]) > 20:
        print(f"    ... and {len(plan['batches']) - 20} more (--json lists all)")
    return 0
