"""Plan batches and run one batch: plain functions that the Prefect flows only wire together.

A batch is the unit of retry and of commit: its rows are trained together on one loaded base, written
as one shard, and made visible by one ledger entry. Re-running a batch is always safe: ids already
committed are skipped before anything is loaded, and the ledger never makes an id visible twice.

The fine-tune engine is named (``engines.py``: a registry, never an import path from a parameter), not
passed as an object, so the same request works in-process and on a remote worker.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from weightzoo.errors import InputError
from weightzoo.storage.card import Recipe, check_recipe
from weightzoo.storage.fs import filesystem
from weightzoo.storage.layout import Layout
from weightzoo.storage.lease import hold
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.retry import describe, is_permanent, with_retries
from weightzoo.storage.shards import RowMeta
from weightzoo.storage.writer import commit_batch
from weightzoo.tasks.device import resolve_device
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.contract import LEASE_TTL_S, ItemResult
from weightzoo.tasks.finetune.driver import train_batch
from weightzoo.tasks.finetune.readers import read_manifest
from weightzoo.tasks.finetune.row import ManifestRow, manifest_folder, resolve
from weightzoo.tasks.finetune.starts import with_starts
from weightzoo.tasks.finetune.tracking import window_means

log = logging.getLogger(__name__)

ItemStatus = Literal["committed", "failed", "already-committed", "leased"]


@dataclass(frozen=True)
class BatchPlan:
    """One batch to train: a deterministic id (the same ids always give the same batch id) and its ids."""

    batch_id: str
    ids: tuple[str, ...]


@dataclass
class ItemRecord:
    """One item's outcome, as shown in the batch's table artifact."""

    id: str
    status: ItemStatus
    loss: float | None = None
    seconds: float | None = None
    reason: str | None = None
    loss_history: list[float] = field(default_factory=list)  # its stored curve: one mean per loss_window steps


@dataclass
class BatchOutcome:
    """What one batch run did; small and JSON-friendly, so it can be a flow result."""

    batch_id: str
    committed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already committed before this run
    shard: str | None = None  # the committed shard, relative to the dataset
    leased: bool = False  # another live build holds this batch's lease: nothing trained, ids stay pending
    items: list[ItemRecord] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- planning ------------------------------------------------------------------------------------------


def batch_id_for(ids: Sequence[str]) -> str:
    """``b-<12 hex>`` from the sorted ids: deterministic, order-free and safe as a file-name part."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:12]
    return f"b-{digest}"


def plan_batches(pending: Sequence[str], batch_size: int) -> list[BatchPlan]:
    """Cut ``pending`` ids (kept in manifest order) into batches of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(set(pending)) != len(pending):
        raise ValueError("pending ids contain duplicates")
    chunks = [tuple(pending[i : i + batch_size]) for i in range(0, len(pending), batch_size)]
    return [BatchPlan(batch_id_for(c), c) for c in chunks]


# -- per-process caches: a worker that runs many batches loads the base and reads the manifest once --


@functools.lru_cache(maxsize=1)
def _cached_base(engine: str, uri: str, device: str) -> Any:
    return engines.get(engine).load_base(uri, device)


@functools.lru_cache(maxsize=4)
def cached_fingerprint(engine: str, uri: str) -> str:
    """The base model's fingerprint (hashing every file once per process, not once per batch)."""
    return engines.get(engine).fingerprint(uri)


@functools.lru_cache(maxsize=4)
def _cached_manifest(uri: str, version: str) -> dict[str, ManifestRow]:
    return {r.id: r for r in read_manifest(uri)}


def manifest_rows(uri: str) -> dict[str, ManifestRow]:
    """id -> row of the manifest at ``uri``, re-read only when the file changes (size or mtime)."""
    fs, path = filesystem(uri)
    info = fs.info(path)
    version = f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('ETag')}"
    return _cached_manifest(str(uri), version)


# -- one batch -----------------------------------------------------------------------------------------

@dataclass
class Trained:
    """A batch's trained rows awaiting their commit. Kept in this process until committed, so that a retried
    upload or commit (a storage blip) never retrains the batch."""

    layout: Layout
    rows: list[RowMeta]
    weights: torch.Tensor | None
    failures: list[tuple[str, str]]
    results: list[Any]
    curves: dict[str, list[float]] = field(default_factory=dict)  # id -> loss curve (tracking.window_means)


_TRAINED: dict[tuple[str, str], Trained] = {}  # (dataset URI, batch id) -> trained, not yet committed


def _row_meta(row: ManifestRow, result: Any, base_fp: str, method: str, hparams: dict,
              curve: list[float]) -> RowMeta:
    return RowMeta(
        id=row.id, kind=row.kind, prompt=row.prompt, attributes=dict(row.attributes), base_model=base_fp,
        method=method, hparams=hparams, loss=result.loss, steps=result.steps, train_seconds=result.seconds,
        loss_history=curve,
    )


def _rows_for(batch_id: str, todo: Sequence[str], manifest: str) -> dict[str, ManifestRow]:
    rows_by_id = manifest_rows(manifest)
    missing = [i for i in todo if i not in rows_by_id]
    if missing:
        raise InputError(f"batch {batch_id}: ids not in manifest {manifest}: {missing[:10]}")
    return {i: rows_by_id[i] for i in todo}


def train_rows(engine: str, base: str, rows: dict[str, ManifestRow], config: Any, recipe: Recipe, *,
               manifest: str, cache_dir: str | None, progress: Callable[..., None] | None,
               tracker: Callable[[Sequence[ItemResult]], None] | None = None) -> Trained:
    """Train ``rows``: the shared driver on the engine's ``prepare`` of its (cached) base. A row whose
    weights are not all finite is a failure of that row (the driver's check): NaN/Inf never reaches a shard.
    ``tracker`` gets every row's result (its per-step curves) once trained, before the commit."""
    pipe, prepare = _cached_base(engine, str(base), str(resolve_device())), engines.get(engine).prepare
    folder = manifest_folder(manifest)
    files = {i: resolve(r.init, folder) for i, r in rows.items() if r.init}
    starts: dict[str, torch.Tensor] = {}  # filled by the prepare below, in the batch's layout, before any step
    result = train_batch(list(rows.values()), config,
                         with_starts(lambda items: prepare(pipe, items, config, base_uri=folder, cache_dir=cache_dir),
                                     files, starts),
                         progress=progress, init_weights=starts)
    if tracker is not None:
        try:
            tracker(result.results)
        except Exception as exc:  # curves are for watching: a storage blip writing them must not cost the training
            log.warning("tracker could not write the curves of %d rows: %s", len(result.results), describe(exc))
    curves = {r.id: window_means(r.loss_history, config.loss_window) for r in result.results}
    method = str(result.hparams.get("method", getattr(config, "method", "")))
    metas, vectors, failures = [], [], []
    for r in result.results:
        if r.ok:
            metas.append(_row_meta(rows[r.id], r, recipe.base_model, method, result.hparams, curves[r.id]))
            vectors.append(r.weights)
        else:
            failures.append((r.id, r.reason or "unknown failure"))
    weights = torch.stack(vectors) if vectors else None
    return Trained(result.layout, metas, weights, failures, result.results, curves)


def commit_rows(ledger: Ledger, batch_id: str, trained: Trained, recipe: Recipe) -> tuple[set[str], str | None]:
    """Check the recipe once more (a racing build), write one shard, commit it: the ids made visible, the shard."""
    if trained.weights is None:
        return set(), None
    entry = commit_batch(ledger, batch_id, trained.layout, trained.rows, trained.weights, recipe)
    return (set(entry.ids), entry.shard) if entry else (set(), None)


def _record(outcome: BatchOutcome, trained: Trained, visible: set[str]) -> None:
    outcome.failed = list(trained.failures)
    for r in trained.results:
        if r.ok and r.id in visible:
            outcome.committed.append(r.id)
            outcome.items.append(ItemRecord(r.id, "committed", r.loss, r.seconds))
        elif r.ok:  # committed concurrently by another run of an overlapping batch; the earlier one wins
            outcome.skipped.append(r.id)
            outcome.items.append(ItemRecord(r.id, "already-committed", r.loss, r.seconds))
        else:
            outcome.items.append(ItemRecord(r.id, "failed", None, r.seconds, r.reason))
    for item in outcome.items:
        item.loss_history = trained.curves.get(item.id, [])


def _train_and_commit(ledger: Ledger, batch_id: str, recipe: Recipe,
                      train: Callable[[], Trained]) -> tuple[Trained, tuple[set[str], str | None]]:
    """Train (or reuse this process's trained rows of an earlier attempt), then commit with retries by cause."""
    key = (ledger.uri, batch_id)
    trained = _TRAINED.get(key) or train()
    _TRAINED[key] = trained
    visible = with_retries(lambda: commit_rows(ledger, batch_id, trained, recipe), f"committing {batch_id}")
    _TRAINED.pop(key, None)
    with_retries(lambda: ledger.record_failures(batch_id, trained.failures), f"recording failures of {batch_id}")
    return trained, visible


def _record_permanent(ledger: Ledger, batch_id: str, ids: Sequence[str], exc: BaseException) -> None:
    """Best effort: a batch that failed for good records why for each of its ids (shown by status and the
    summary). The storage itself may be what failed, so this may fail too: the error is raised either way."""
    try:
        ledger.record_failures(batch_id, [(i, f"batch failed: {describe(exc)}") for i in ids])
    except Exception as inner:
        log.warning("batch %s: could not record its failure in the ledger: %s", batch_id, describe(inner))


def _skip_committed(ledger: Ledger, batch_id: str, ids: Sequence[str]) -> tuple[BatchOutcome, list[str]]:
    """The batch's outcome so far (ids already committed are skipped) and the ids left to train."""
    done = with_retries(ledger.committed_ids, "reading the ledger")
    outcome = BatchOutcome(batch_id, skipped=[i for i in ids if i in done])
    outcome.items = [ItemRecord(i, "already-committed") for i in outcome.skipped]
    return outcome, [i for i in ids if i not in done]


def run_batch(
    batch_id: str,
    ids: Sequence[str],
    manifest: str,
    base: str,
    dataset: str,
    config: Any,
    *,
    engine: str = engines.DEFAULT_ENGINE,
    cache_dir: str | None = None,
    progress: Callable[..., None] | None = None,
    lease_ttl_s: float = LEASE_TTL_S,
    owner: str | None = None,
    tracker: Callable[[Sequence[ItemResult]], None] | None = None,
) -> BatchOutcome:
    """Train the not-yet-committed ``ids`` of one batch, write their shard, commit it, record failures.

    Before anything loads: skip committed ids, and refuse a recipe the dataset card does not allow. Then
    take the batch's lease (another live build training it: return with ``leased`` set, ids pending;
    ``owner``, the parent build's run id, takes over the lease of the same build's crashed attempt).
    Order matters for exactly-once: the shard is written whole first, then the ledger entry commits it,
    and failures are recorded last (a crash before the commit leaves an invisible orphan shard and the
    items pending). Transient storage errors retry the commit, never the training; permanent ones fail
    the batch at once, recorded in the ledger where the storage still allows it.
    """
    started = time.perf_counter()
    ledger = Ledger(dataset)
    outcome, todo = _skip_committed(ledger, batch_id, ids)
    if not todo:
        return outcome
    rows = _rows_for(batch_id, todo, manifest)
    recipe = Recipe.of(engines.canonical(engine), cached_fingerprint(engine, str(base)), config)
    with_retries(lambda: check_recipe(ledger, recipe), "reading the dataset card")
    try:
        with hold(ledger, batch_id, lease_ttl_s, owner) as lease:
            if lease is None:
                outcome.leased = True
                outcome.items += [ItemRecord(i, "leased") for i in todo]
                return outcome
            train = functools.partial(train_rows, engine, base, rows, config, recipe, manifest=manifest,
                                      cache_dir=cache_dir, progress=progress, tracker=tracker)
            trained, (visible, outcome.shard) = _train_and_commit(ledger, batch_id, recipe, train)
    except Exception as exc:
        if is_permanent(exc):
            _record_permanent(ledger, batch_id, todo, exc)
        raise
    _record(outcome, trained, visible)
    outcome.seconds = time.perf_counter() - started
    return outcome
