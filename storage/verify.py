"""Check a whole dataset against its ledger, and quarantine what fails (``weightzoo verify``).

Every commit entry (including those left with no visible ids) is checked: its shard is present, has
the recorded size, the layout fingerprint in its footer, the recorded row count and ids, and the
CRC32 of its weights. Every ledger file (commits and failures) must parse. ``repair=True`` moves each
bad commit entry and each unreadable ledger file to ``ledger/quarantine/`` (copy, then delete, with a
sidecar giving the reason): the entry's ids become pending, so the next ``weightzoo build`` retrains
them. The bad shard itself stays in ``shards/`` as an orphan until ``weightzoo gc`` collects it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from weightzoo.errors import CorruptShardError, NotFoundError
from weightzoo.storage.dataset import verified_shard_batches
from weightzoo.storage.fs import StorageOptions, redact
from weightzoo.storage.ledger import COMMITS, FAILURES, Ledger, parse_commit, parse_failure


@dataclass(frozen=True)
class Problem:
    """One bad thing verify found. Paths are relative to the dataset root."""

    ledger_file: str  # the ledger file that repair quarantines
    shard: str | None  # the shard the entry points at (None for an unreadable ledger file)
    reason: str
    ids: int = 0  # ids the entry commits (they become pending when it is quarantined)


@dataclass
class VerifyReport:
    dataset: str  # redacted URI, safe to print
    commits: int = 0  # commit entries checked
    failures: int = 0  # failure records checked
    problems: list[Problem] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)  # where repair moved each bad ledger file

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shard(ledger: Ledger, entry: dict) -> None:
    """Read one commit entry's shard through the committed-shard reader; ``CorruptShardError`` says why."""
    ids: list[str] = []
    batches = verified_shard_batches(
        ledger.fs,
        ledger.abspath(entry["shard"]),
        entry["shard"],
        nbytes=entry["nbytes"],
        crc32=entry["crc32"],
        fingerprint=entry["layout"],
        columns=["id"],
        weights=False,
        verify=True,
    )
    for table, _ in batches:
        ids.extend(table.column("id").to_pylist())
    if len(ids) != entry["rows"]:
        raise CorruptShardError(f"shard {entry['shard']} has {len(ids)} rows, its ledger entry says {entry['rows']}")
    missing = set(entry["ids"]) - set(ids)
    if missing:
        raise CorruptShardError(f"shard {entry['shard']} lacks {len(missing)} ids its ledger entry commits")


def _check_commits(ledger: Ledger, report: VerifyReport) -> None:
    for name, blob in ledger.raw_files(COMMITS):
        report.commits += 1
        rel = f"{COMMITS}/{name}"
        try:
            entry = parse_commit(blob)
        except (ValueError, UnicodeDecodeError) as e:
            report.problems.append(Problem(rel, None, f"unreadable ledger file: {e}"))
            continue
        try:
            check_shard(ledger, entry)
        except CorruptShardError as e:
            report.problems.append(Problem(rel, entry["shard"], str(e), len(entry["ids"])))


def _check_failures(ledger: Ledger, report: VerifyReport) -> None:
    for name, blob in ledger.raw_files(FAILURES):
        report.failures += 1
        try:
            parse_failure(blob)
        except (ValueError, UnicodeDecodeError) as e:
            report.problems.append(Problem(f"{FAILURES}/{name}", None, f"unreadable ledger file: {e}"))


def verify_dataset(dataset_uri: str, repair: bool = False, storage_options: StorageOptions = None) -> VerifyReport:
    """Check every ledger file and committed shard; with ``repair``, quarantine each bad one."""
    ledger = Ledger(dataset_uri, storage_options)
    if not ledger.exists():
        raise NotFoundError(f"no dataset at {redact(ledger.uri)}")
    report = VerifyReport(dataset=redact(ledger.uri))
    _check_commits(ledger, report)
    _check_failures(ledger, report)
    if repair:
        for p in report.problems:
            details = {"shard": p.shard} if p.shard else {}
            report.quarantined.append(ledger.quarantine(p.ledger_file, p.reason, **details).path)
    return report
