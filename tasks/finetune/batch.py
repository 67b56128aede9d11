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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from weightzoo.storage.fs import filesystem
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.shards import RowMeta, write_shard
from weightzoo.tasks.device import resolve_device
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.manifest import ManifestRow, manifest_folder, read_manifest

# A deployment batch is one fresh worker process whose start (imports, base load, API calls) must stay a
# small share of its training time, while a crash loses at most the batch in flight: 64 keeps the start
# under 1% at weightzoo's defaults (docs/BENCHMARKS.md, "Orchestration overhead").
DEFAULT_BATCH_SIZE = 64

ItemStatus = Literal["committed", "failed", "already-committed"]


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


@dataclass
class BatchOutcome:
    """What one batch run did; small and JSON-friendly, so it can be a flow result."""

    batch_id: str
    committed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already committed before this run
    shard: str | None = None
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


def _row_meta(row: ManifestRow, result: Any, base_fp: str, method: str, hparams: dict) -> RowMeta:
    return RowMeta(
        id=row.id, kind=row.kind, prompt=row.prompt, attributes=dict(row.attributes), base_model=base_fp,
        method=method, hparams=hparams, loss=result.loss, steps=result.steps, train_seconds=result.seconds,
    )


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
    progress: Callable[[int, int], None] | None = None,
) -> BatchOutcome:
    """Train the not-yet-committed ``ids`` of one batch, write their shard, commit it, record failures.

    Order matters for exactly-once: the shard is written whole first, then the ledger entry commits
    it, and failures are recorded last (a crash before the commit leaves an invisible orphan shard
    and the items pending). Nothing is loaded when every id is already committed.
    """
    started = time.perf_counter()
    ledger = Ledger(dataset)
    done = ledger.committed_ids()
    outcome = BatchOutcome(batch_id, skipped=[i for i in ids if i in done])
    outcome.items = [ItemRecord(i, "already-committed") for i in outcome.skipped]
    todo = [i for i in ids if i not in done]
    if not todo:
        return outcome

    rows_by_id = manifest_rows(manifest)
    missing = [i for i in todo if i not in rows_by_id]
    if missing:
        raise KeyError(f"batch {batch_id}: ids not in manifest {manifest}: {missing[:10]}")
    rows = [rows_by_id[i] for i in todo]

    pipe = _cached_base(engine, str(base), str(resolve_device()))
    result = engines.get(engine).train(pipe, rows, config, base_uri=manifest_folder(manifest), cache_dir=cache_dir,
                                       progress=progress)
    ok = [r for r in result.results if r.ok]
    method = str(result.hparams.get("method", getattr(config, "method", "lora")))
    if ok:
        base_fp = cached_fingerprint(engine, str(base))
        metas = [_row_meta(rows_by_id[r.id], r, base_fp, method, result.hparams) for r in ok]
        weights = torch.stack([r.weights for r in ok])
        info = write_shard(ledger.fs, ledger.new_shard_path(batch_id), result.layout, metas, weights)
        entry = ledger.commit(batch_id, info, base_model=base_fp)
        outcome.shard = entry.shard if entry else None
        visible = set(entry.ids) if entry else set()
    else:
        visible = set()
    outcome.failed = [(r.id, r.reason or "unknown failure") for r in result.results if not r.ok]
    ledger.record_failures(batch_id, outcome.failed)

    for r in result.results:
        if r.ok and r.id in visible:
            outcome.committed.append(r.id)
            outcome.items.append(ItemRecord(r.id, "committed", r.loss, r.seconds))
        elif r.ok:  # committed concurrently by another run of an overlapping batch; the earlier one wins
            outcome.skipped.append(r.id)
            outcome.items.append(ItemRecord(r.id, "already-committed", r.loss, r.seconds))
        else:
            outcome.items.append(ItemRecord(r.id, "failed", None, r.seconds, r.reason))
    outcome.seconds = time.perf_counter() - started
    return outcome
