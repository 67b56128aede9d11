"""The ledger: a dataset's record of committed shards and failed items. The ledger entry is the commit.

Layout of a dataset URI::

    shards/<batch>-<token>.parquet          written first, complete (temp + rename, or one S3 upload)
    ledger/commits/<batch>-<token>.json     written last: ids, shard path, size, crc32, fingerprints
    ledger/failures/<batch>-<token>.json    items of one attempt that failed, with reasons
    ledger/quarantine/<commits|failures>/   ledger files ``weightzoo verify --repair`` moved aside,
                                            each with a ``<name>.reason.json`` sidecar saying why

A shard with no commit entry (a writer killed before committing) is never read. Two commits cannot
both make one id visible: ``commit`` drops ids that are already committed, and for the race where two
writers commit the same id at once, every reader resolves duplicates the same way (the earliest
entry in canonical order wins), so an id is visible exactly once.

A ledger file that does not parse stops every reader with ``CorruptLedgerError`` naming it: guessing
past it could hide commits. ``quarantine`` moves such a file (or the entry of a bad shard) aside, which
makes its ids pending again, so the next build retrains them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from weightzoo.errors import CorruptShardError
from weightzoo.storage.fs import (
    StorageOptions,
    UnsafeIdError,
    check_id,
    filesystem,
    join,
    redact,
    storage_step,
    write_bytes,
)
from weightzoo.storage.shards import LayoutMismatchError, ShardInfo

COMMITS = "ledger/commits"
FAILURES = "ledger/failures"
QUARANTINE = "ledger/quarantine"
SHARDS = "shards"
BUILDS = "_builds"  # <dataset>/_builds/<UTC time>.json: each build's resolved config; no reader lists it
REASON_SUFFIX = ".reason.json"  # quarantine sidecar; entry names end "-<token>.json", so never clash
_SHARD_TOKEN = re.compile(r"[0-9a-f]{12}")  # uuid4().hex[:12]: attempts at one batch never share a name


def is_shard_name(name: str) -> bool:
    """Whether ``name`` is a file name ``Ledger.new_shard_path`` makes: ``<batch>-<token>.parquet``."""
    batch, _, token = name.removesuffix(".parquet").rpartition("-")
    if not name.endswith(".parquet") or not _SHARD_TOKEN.fullmatch(token):
        return False
    try:
        check_id(batch)
    except UnsafeIdError:
        return False
    return True


@dataclass(frozen=True)
class CommitEntry:
    """One committed shard. ``ids`` are the rows of that shard that are visible."""

    batch: str
    shard: str  # path relative to the dataset root
    ids: tuple[str, ...]
    rows: int  # rows in the shard file (>= len(ids) if some were already committed elsewhere)
    nbytes: int
    crc32: int
    layout: str
    base_model: str
    committed_at: str
    name: str = ""  # entry file name; tie-breaker of the canonical order
    recipe: dict[str, Any] | None = None  # the dataset card's recipe at commit: lets verify rebuild a lost card


@dataclass(frozen=True)
class Failure:
    id: str
    reason: str
    attempt: int  # how many recorded attempts of this id have failed
    batch: str
    at: str


class CorruptLedgerError(CorruptShardError, ValueError):
    """A ledger file that cannot be parsed. A ``ValueError`` too, so callers catching that still print it."""


@dataclass(frozen=True)
class Quarantined:
    """A ledger file moved aside by ``Ledger.quarantine``; paths relative to the dataset root."""

    path: str  # where the file is now, under ledger/quarantine/
    origin: str  # where it was, e.g. ledger/commits/<name>.json
    reason: str
    at: str


_COMMIT_FIELDS = {
    "batch": str, "shard": str, "ids": list, "rows": int, "nbytes": int, "crc32": int,
    "layout": str, "base_model": str, "committed_at": str,
}
_FAILURE_FIELDS = {"batch": str, "at": str, "items": list}


def _check_fields(d: Any, fields: dict[str, type]) -> dict:
    """``d`` if it is an object with every field of the right type, else ValueError saying which is not."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    for key, kind in fields.items():
        if not isinstance(d.get(key), kind) or isinstance(d.get(key), bool):
            raise ValueError(f"field {key!r} is missing or not a {kind.__name__}")
    return d


def parse_commit(blob: bytes) -> dict:
    """A commit entry's JSON → its fields (unknown keys dropped); ValueError if it is not a commit entry."""
    d = _check_fields(json.loads(blob), _COMMIT_FIELDS)
    if not all(isinstance(i, str) for i in d["ids"]):
        raise ValueError("field 'ids' is not a list of strings")
    out = {k: d[k] for k in _COMMIT_FIELDS}
    if isinstance(d.get("recipe"), dict):
        out["recipe"] = d["recipe"]
    return out


def parse_failure(blob: bytes) -> dict:
    """A failure record's JSON → its fields; ValueError if it is not a failure record."""
    d = _check_fields(json.loads(blob), _FAILURE_FIELDS)
    for item in d["items"]:
        _check_fields(item, {"id": str, "reason": str})
    return d


_PARSERS = {COMMITS: parse_commit, FAILURES: parse_failure}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Ledger:
    """Committed shards and failed items of one dataset (a local path or any fsspec URI)."""

    def __init__(self, dataset_uri: str, storage_options: StorageOptions = None) -> None:
        self.uri = str(dataset_uri).rstrip("/")
        self.fs, self.root = filesystem(self.uri, storage_options)

    # --- paths -------------------------------------------------------------------------------
    def new_shard_path(self, batch: str) -> str:
        """A fresh, never-reused shard path for one attempt at ``batch`` (attempts never clobber); its
        name is what ``is_shard_name`` accepts."""
        return join(self.root, SHARDS, f"{check_id(batch)}-{uuid.uuid4().hex[:12]}.parquet")

    def abspath(self, relative: str) -> str:
        return join(self.root, relative)

    def _relative(self, path: str) -> str:
        return path[len(self.root) + 1 :] if path.startswith(self.root + "/") else path

    def exists(self) -> bool:
        """Whether the dataset root exists (a prefix with objects, on S3)."""
        return bool(self.fs.exists(self.root))

    # --- reading -----------------------------------------------------------------------------
    def raw_files(self, folder: str) -> list[tuple[str, bytes]]:
        """(file name, bytes) of every ``.json`` file of a ledger folder, sorted by name, unparsed."""
        path = join(self.root, folder)
        self.fs.invalidate_cache(path)  # s3fs caches listings; the ledger must see other writers
        try:
            names = sorted(p for p in self.fs.ls(path, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        if not names:
            return []
        blobs = self.fs.cat(names)  # concurrent on S3
        return [(n.rsplit("/", 1)[-1], blobs[n]) for n in names]

    def corrupt(self, folder: str, name: str, why: Exception | str) -> CorruptLedgerError:
        """The error for an unparsable ledger file: names it and says how to get past it."""
        return CorruptLedgerError(
            f"ledger file {redact(join(self.uri, folder, name))} is unreadable ({why}); "
            f"run weightzoo verify --repair --dataset {redact(self.uri)} to quarantine it"
        )

    def _read_entries(self, folder: str) -> list[tuple[str, dict]]:
        out = []
        for name, blob in self.raw_files(folder):
            try:
                out.append((name, _PARSERS[folder](blob)))
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                raise self.corrupt(folder, name, e) from e
        return out

    def commits(self) -> list[CommitEntry]:
        """Every commit entry in canonical order, each listing only the ids it makes visible."""
        raw = sorted(self._read_entries(COMMITS), key=lambda e: (e[1]["committed_at"], e[0]))
        seen: set[str] = set()
        out = []
        for name, d in raw:
            ids = tuple(i for i in d["ids"] if i not in seen)
            seen.update(ids)
            out.append(CommitEntry(**{**d, "ids": ids, "name": name}))
        return out

    def committed_ids(self) -> set[str]:
        return {i for c in self.commits() for i in c.ids}

    def failed(self) -> dict[str, Failure]:
        """Items whose latest attempt failed and that are not committed since: id → last failure."""
        committed = self.committed_ids()
        out: dict[str, Failure] = {}
        attempts: dict[str, int] = {}
        for _, d in sorted(self._read_entries(FAILURES), key=lambda e: (e[1]["at"], e[0])):
            for item in d["items"]:
                attempts[item["id"]] = attempts.get(item["id"], 0) + 1
                if item["id"] not in committed:
                    out[item["id"]] = Failure(item["id"], item["reason"], attempts[item["id"]], d["batch"], d["at"])
        return out

    def pending(self, manifest_ids: Iterable[str], include_failed: bool = True) -> list[str]:
        """Manifest ids (in manifest order) that still need training: not committed, and not failed unless asked."""
        done = self.committed_ids()
        skip = done if include_failed else done | set(self.failed())
        return [i for i in manifest_ids if i not in skip]

    # --- writing -----------------------------------------------------------------------------
    def commit(
        self, batch: str, shard: ShardInfo, base_model: str = "", recipe: dict[str, Any] | None = None
    ) -> CommitEntry | None:
        """Make a complete shard's rows visible. Call only after the shard is fully written (``commit_batch``
        in storage/writer.py does the whole protocol); ``recipe`` is recorded for ``verify --repair``.

        Ids already committed by another entry are left out of this one; returns None (and writes
        nothing) when every id was already committed, so a rerun of a committed batch is a no-op.
        """
        check_id(batch)
        commits = self.commits()
        other = next((c for c in commits if c.layout != shard.layout), None)
        if other is not None:
            raise LayoutMismatchError(
                f"batch {batch}: shard layout {shard.layout} differs from the dataset's {other.layout} "
                f"(shard {other.shard}); a dataset never mixes layouts — use a new dataset URI for this config"
            )
        done = {i for c in commits for i in c.ids}
        ids = tuple(i for i in shard.ids if i not in done)
        if not ids:
            return None
        shard_rel = self._relative(shard.path)
        name = shard_rel.rsplit("/", 1)[-1].removesuffix(".parquet") + ".json"
        entry = CommitEntry(
            batch=batch,
            shard=shard_rel,
            ids=ids,
            rows=len(shard.ids),
            nbytes=shard.nbytes,
            crc32=shard.crc32,
            layout=shard.layout,
            base_model=base_model,
            committed_at=_now(),
            recipe=recipe,
        )
        body = {k: v for k, v in asdict(entry).items() if k != "name" and not (k == "recipe" and v is None)}
        write_bytes(self.fs, join(self.root, COMMITS, name), json.dumps(body).encode())
        return CommitEntry(**{**body, "name": name})

    def quarantine(self, relative: str, reason: str, **details: Any) -> Quarantined:
        """Move one ledger file (``ledger/commits/x.json``) aside, with a sidecar saying why.

        Copy first, then delete the original (a move on any storage, S3 included): a crash in between
        leaves the entry in place, and a rerun quarantines it again. A moved commit entry no longer
        commits its ids, so they are pending and the next build retrains them.
        """
        folder, _, name = relative.rpartition("/")
        if folder not in _PARSERS or not name.endswith(".json"):
            raise ValueError(f"{relative} is not a file of {COMMITS} or {FAILURES}")
        kind = folder.rsplit("/", 1)[-1]
        dest = f"{QUARANTINE}/{kind}/{name}"
        record = Quarantined(dest, relative, reason, _now())
        sidecar = {**asdict(record), **details}
        with storage_step(self.uri, f"quarantining {relative}"):
            write_bytes(self.fs, self.abspath(dest), self.fs.cat_file(self.abspath(relative)))
            write_bytes(self.fs, self.abspath(dest.removesuffix(".json") + REASON_SUFFIX), json.dumps(sidecar).encode())
            self.fs.rm(self.abspath(relative))
        return record

    def quarantined(self) -> list[Quarantined]:
        """Every quarantined ledger file, oldest first (read from the sidecars)."""
        path = join(self.root, QUARANTINE)
        self.fs.invalidate_cache(path)
        try:
            sidecars = sorted(p for p in self.fs.find(path) if p.endswith(REASON_SUFFIX))
        except FileNotFoundError:
            return []
        out = []
        for p, blob in sorted(self.fs.cat(sidecars).items()) if sidecars else []:
            try:
                d = json.loads(blob)
                out.append(Quarantined(d["path"], d["origin"], d["reason"], d["at"]))
            except (ValueError, KeyError, TypeError):
                rel = self._relative(p)
                out.append(Quarantined(rel, "?", "its quarantine sidecar is unreadable", ""))
        return sorted(out, key=lambda q: (q.at, q.path))

    def record_failures(self, batch: str, failures: Sequence[tuple[str, str]]) -> None:
        """Record one attempt's failed items as (id, reason); reasons are shown to users as they are."""
        if not failures:
            return
        check_id(batch)
        body = {"batch": batch, "at": _now(), "items": [{"id": i, "reason": r} for i, r in failures]}
        name = f"{batch}-{uuid.uuid4().hex[:12]}.json"
        write_bytes(self.fs, join(self.root, FAILURES, name), json.dumps(body).encode())
