"""The build's own checks, plan and record, in the build flow's room: ``weightzoo build``, ``weightzoo.build``
and a build started from the build-dataset deployment all run them (the flow calls ``check_build`` and
``record_config`` itself; the CLI also calls ``check_inputs`` before it starts anything, so a typo is
answered in a second).

- ``check_inputs``: the manifest is a readable file with rows, the dataset is no file, the engine is
  registered and the base is of its kind (``Engine.check_base``: index files only, nothing loads). Light:
  no model loads, no server starts, nothing is written.
- ``plan_of``: what a build would do (``build --dry-run``): the recipe, and the batches of what is pending.
- ``record_config``: ``<dataset>/_builds/<UTC time>.json``, the build's resolved config, written only once
  the inputs passed (no reader lists ``_``-prefixed folders).

Every refusal is one line (``weightzoo.errors``), named by how the caller names the input: the flow and the
Python API by its field (``manifest: no such file ...``), the CLI by its flag (``--manifest: ...``).
Free of torch and Prefect at import: the CLI's first checks run before either loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from weightzoo.errors import InputError, NotFoundError, StorageError
from weightzoo.storage.fs import filesystem, is_local, join, redact, write_bytes
from weightzoo.tasks.finetune import engines

if TYPE_CHECKING:
    from weightzoo.flows.config import BuildConfig


Namer = Callable[[str], str]  # a field name as the caller's user knows it: itself, or its CLI flag


def _existing_file(uri: str, label: str) -> None:
    """A local file that exists and can be read (a URI is checked by reading it)."""
    fs, path = filesystem(uri)
    if not is_local(fs):
        return
    if not os.path.exists(path):
        raise NotFoundError(f"{label}: no such file {uri}")
    if not os.path.isfile(path):
        raise InputError(f"{label}: {uri} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{label}: {uri} is not readable")


def _folder_or_absent(uri: str, label: str) -> None:
    """A local path that is a folder or does not exist yet (a dataset to create or resume)."""
    fs, path = filesystem(uri)
    if is_local(fs) and os.path.isfile(path):
        raise InputError(f"{label}: {uri} is a file, not a folder")


def check_base(engine: str, base: str, label: str = "base") -> None:
    """The base is of the engine's kind, by the engine's own light check; an engine without one
    (``check_base`` None, e.g. a plugin's) gets only this: a local base path exists."""
    check = engines.get(engine).check_base
    try:
        if check is not None:
            check(base)
            return
        fs, path = filesystem(base)
        if is_local(fs) and not os.path.exists(path):
            raise NotFoundError(f"no base at {base}")
    except NotFoundError as e:
        raise NotFoundError(f"{label}: {e}") from None
    except InputError as e:
        raise InputError(f"{label}: {e}") from None


def check_inputs(manifest: str, base: str, dataset: str, engine: str | None = None, name: Namer = str) -> str:
    """The manifest reads and has rows, the base is of the engine's kind, the dataset is no file; returns
    the engine's registered name. Rows are parsed, not validated (``load_and_validate`` decodes images)."""
    from weightzoo.tasks.finetune.readers import read_manifest

    _existing_file(manifest, name("manifest"))
    _folder_or_absent(dataset, name("dataset"))
    engine = engines.canonical(engine or engines.DEFAULT_ENGINE)  # unknown engine: one line naming the known
    check_base(engine, base, name("base"))
    if not read_manifest(manifest):  # unreadable or malformed: ManifestError, one line per problem
        raise InputError(f"{name('manifest')} {manifest} has no rows")
    return engine


def check_build(config: BuildConfig) -> None:
    """``check_inputs`` on a build's config (its fields name the inputs), and its tracker's package: the
    build flow's first step."""
    from weightzoo.tasks.finetune.tracking import check_report_to

    check_inputs(config.manifest, config.base, config.dataset, config.engine)
    check_report_to(config.report_to)


def record_config(config: BuildConfig) -> str:
    """Write the build's resolved config beside the dataset's ledger; returns its URI. Storage that refuses
    the write (read-only, permission denied, no space) is one ``StorageError`` line."""
    from weightzoo.storage.health import storage_fault

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    from weightzoo.storage.ledger import BUILDS  # here: the ledger module imports torch, and --help must not

    uri = join(config.dataset, BUILDS, f"{stamp}.json")
    fs, path = filesystem(uri)
    data = json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True).encode()
    try:
        write_bytes(fs, path, data)
    except OSError as e:
        fault = storage_fault(e, config.dataset)
        if fault is None and e.errno is None:
            raise  # not a refusal of the storage's: a bug keeps its traceback
        raise fault or StorageError(f"storage of {redact(config.dataset)} cannot be used: writing the build's "
                                    f"config to {redact(uri)} failed: {e.strerror or e}") from None
    return uri


def plan_of(config: BuildConfig) -> dict[str, Any]:
    """What the build would do: the resolved config, its recipe, and the batches of what is pending.
    Only reads (the dataset, if it exists; the base's fingerprint files; the manifest and its images)."""
    from weightzoo.storage import card
    from weightzoo.storage.card import Recipe
    from weightzoo.storage.ledger import Ledger
    from weightzoo.tasks.finetune.batch import cached_fingerprint, plan_batches
    from weightzoo.tasks.finetune.manifest import load_and_validate

    ids = [r.id for r in load_and_validate(config.manifest, rules=engines.get(config.engine).rows)]
    recipe = Recipe.of(config.engine, cached_fingerprint(config.engine, config.base), config.finetune)
    ledger = Ledger(config.dataset)
    existing = ledger.exists()
    if existing:
        card.check_recipe(ledger, recipe)
    committed = ledger.committed_ids() if existing else set()
    pending = ledger.pending(ids, include_failed=config.retry_failed) if existing else ids
    batches = plan_batches(pending, config.batch_size)
    return {"config": config.model_dump(mode="json"), "dataset_exists": existing,
            "recipe": {"engine": recipe.engine, "base_fingerprint": recipe.base_model,
                       "config_fingerprint": recipe.config_fingerprint},
            "manifest_ids": len(ids), "committed": len(committed & set(ids)), "to_train": list(pending),
            "batches": [{"batch_id": b.batch_id, "ids": list(b.ids)} for b in batches]}
