"""Find and remove orphan shards (shard files under ``shards/`` that no commit entry points at) and
stale temp files (a killed writer's ``shards/_tmp/*``).

A writer killed between writing its shard and committing it, or a commit refused (another layout),
leaves a complete shard that readers never see. It only costs storage, so removing it is safe —
except that an in-flight batch also has a shard without a commit entry, for the moment between its
upload and its commit. Hence the grace period: a shard modified less than ``older_than`` ago is
never a candidate, whatever the ledger says. The grace must exceed the longest time from a shard's
modification time to its commit (on S3 a multipart object's ``LastModified`` may be when its
upload *started*, so count a slow upload in too).

A build holds its batch's lease (storage/lease.py) from before it writes the shard until after the commit,
so gc also keeps every shard and temp file of a batch whose lease a live holder has, and temp files younger
than the lease TTL whatever the grace: ``--older-than 0s`` during a build deletes no in-flight batch's files.
Order makes this safe: the files are listed first, then the leases, then the ledger. A file listed while
its writer holds the lease is seen as leased; if the lease is gone by the time it is read, the commit
(written before the release) is in the ledger read after it.

Only files named like the shards ``Ledger.new_shard_path`` makes are considered, plus temp files:
everything under ``shards/_tmp/`` and the ``<shard>.tmp-<hex>`` siblings older writers left. Temp
files are never committed, so the grace period alone protects a write in progress. Ledger files and
anything else under the dataset are never touched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from weightzoo.errors import InputError, NotFoundError
from weightzoo.storage.fs import StorageOptions, join, redact, storage_step
from weightzoo.storage.lease import DEFAULT_TTL_S, leased_batches
from weightzoo.storage.ledger import SHARDS, Ledger, is_shard_name
from weightzoo.storage.shards import TMP_DIR

log = logging.getLogger(__name__)
_LEGACY_TEMP = re.compile(r"(?P<shard>.+\.parquet)\.tmp-[0-9a-f]{12}")  # before temps moved to _tmp/


@dataclass(frozen=True)
class Orphan:
    """An uncommitted shard older than the grace period. ``path`` is relative to the dataset root."""

    path: str
    size: int  # bytes
    mtime: datetime  # UTC


@dataclass
class GcReport:
    """What one gc pass found and (when ``deleted``) removed."""

    dataset: str  # redacted URI, safe to print
    older_than: timedelta
    orphans: list[Orphan] = field(default_factory=list)
    temps: list[Orphan] = field(default_factory=list)  # stale temp files of killed writers
    recent: int = 0  # uncommitted shards and temps inside the grace period, kept (maybe still being written)
    leased: int = 0  # uncommitted shards and temps of batches a live build holds the lease of, kept
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why) — not judged
    deleted: bool = False

    @property
    def nbytes(self) -> int:
        return sum(o.size for o in self.orphans) + sum(t.size for t in self.temps)


def _mtime(info: dict[str, Any]) -> datetime | None:
    """The modification time in an fsspec info dict: local ``mtime`` (epoch s), S3 ``LastModified``."""
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _referenced(ledger: Ledger) -> set[str]:
    """File names of every shard a commit entry points at, including entries left with no visible ids.

    Compared by file name, not full path: names carry a unique token, and an entry whose shard path was
    recorded with another spelling of the dataset root still protects its shard.
    """
    return {c.shard.rsplit("/", 1)[-1] for c in ledger.commits()}


def _list_files(ledger: Ledger, folder: str) -> list[dict[str, Any]]:
    """Files (fsspec info dicts) directly in ``folder`` of the dataset, sorted; none if it is absent."""
    path = join(ledger.root, folder)
    ledger.fs.invalidate_cache(path)
    try:
        listing = ledger.fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted((i for i in listing if i.get("type") == "file"), key=lambda i: i["name"])


def _batch_of(name: str) -> str:
    """The batch a shard or temp file name belongs to: ``<batch>-<token>.parquet[.tmp-<hex>]``."""
    return name.split(".parquet", 1)[0].rpartition("-")[0]


@dataclass(frozen=True)
class _Rule:
    """What keeps a file: modified after ``cutoff``, or its batch in ``leased``."""

    cutoff: datetime
    leased: frozenset[str]


def _judge(ledger: Ledger, info: dict[str, Any], rel: str, rule: _Rule, out: list[Orphan], report: GcReport) -> None:
    """Add ``rel`` to ``out`` unless a live lease or the grace period keeps it (counted) or it has no mtime."""
    cutoff = rule.cutoff
    if _batch_of(rel.rsplit("/", 1)[-1]) in rule.leased:
        report.leased += 1
        return
    mtime = _mtime(info) or _mtime(ledger.fs.info(info["name"]))
    if mtime is None:
        log.warning("gc: %s has no modification time; skipped", rel)
        report.skipped.append((rel, "no modification time"))
    elif mtime > cutoff:
        report.recent += 1
    else:
        out.append(Orphan(rel, int(info.get("size") or 0), mtime))


def _is_temp(name: str) -> bool:
    m = _LEGACY_TEMP.fullmatch(name)
    return bool(m) and is_shard_name(m["shard"])


def _scan(ledger: Ledger, older_than: timedelta, lease_ttl: timedelta, report: GcReport) -> None:
    listing = _list_files(ledger, SHARDS)
    temps = _list_files(ledger, f"{SHARDS}/{TMP_DIR}")
    # Leases, then the ledger, are read *after* the listing (see the module docstring for why this order).
    leased = frozenset(leased_batches(ledger))
    referenced = _referenced(ledger)
    now = datetime.now(UTC)
    shard_rule, temp_rule = _Rule(now - older_than, leased), _Rule(now - max(older_than, lease_ttl), leased)
    for info in listing:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if is_shard_name(name) and name not in referenced:
            _judge(ledger, info, f"{SHARDS}/{name}", shard_rule, report.orphans, report)
        elif _is_temp(name):
            _judge(ledger, info, f"{SHARDS}/{name}", temp_rule, report.temps, report)
    for info in temps:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        _judge(ledger, info, f"{SHARDS}/{TMP_DIR}/{name}", temp_rule, report.temps, report)


def find_orphans(
    dataset_uri: str, older_than: timedelta, storage_options: StorageOptions = None
) -> list[Orphan]:
    """Uncommitted shards of a dataset last modified at least ``older_than`` ago (reads only)."""
    return collect(dataset_uri, older_than, delete=False, storage_options=storage_options).orphans


def collect(
    dataset_uri: str, older_than: timedelta, delete: bool, storage_options: StorageOptions = None,
    lease_ttl: timedelta = timedelta(seconds=DEFAULT_TTL_S),
) -> GcReport:
    """Find orphan shards and stale temp files and, with ``delete=True``, remove them. Raises
    ``NotFoundError`` if the dataset does not exist.

    Files of leased batches are kept, and temp files younger than ``lease_ttl``. Before deleting, the
    ledger is read once more and any shard committed meanwhile is kept too.
    """
    if older_than < timedelta(0):
        raise InputError(f"older_than must not be negative, got {older_than}")
    ledger = Ledger(dataset_uri, storage_options)
    if not ledger.exists():
        raise NotFoundError(f"no dataset at {redact(ledger.uri)}")
    report = GcReport(dataset=redact(ledger.uri), older_than=older_than)
    _scan(ledger, older_than, lease_ttl, report)
    if delete and report.orphans:
        late = _referenced(ledger)
        report.orphans = [o for o in report.orphans if o.path.rsplit("/", 1)[-1] not in late]
    if delete and (report.orphans or report.temps):
        with storage_step(ledger.uri, f"deleting {len(report.orphans)} orphan shard(s) and {len(report.temps)} temp file(s)"):
            ledger.fs.rm([ledger.abspath(o.path) for o in report.orphans + report.temps])
    report.deleted = delete
    return report
