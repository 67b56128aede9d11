"""Check a whole dataset against its ledger, and quarantine what fails (``weightzoo verify``).

Every commit entry (including those left with no visible ids) is checked: its shard is present, has
the recorded size, the layout fingerprint in its footer, the recorded row count and ids, and the
CRC32 of its weights; and every entry has the dataset's one layout (the card's, else the first
commit's), so a shard of another layout copied in with its entry is caught. Every ledger file (commits
and failures) must parse, and so must the dataset card. ``repair=True`` moves each bad commit entry and
each unreadable ledger file to ``ledger/quarantine/`` (copy, then delete, with a sidecar giving the
reason): the entry's ids become pending, so the next ``weightzoo build`` retrains them. The bad shard
itself stays in ``shards/`` as an orphan until ``weightzoo gc`` collects it. An unreadable card is
rebuilt from the recipe the commit entries record, when they all record the same one.

Shards no commit entry points at (a writer killed before its commit, a batch in flight, an entry
deleted by hand) are listed in ``uncommitted``, never deleted and never read: ``weightzoo gc`` owns them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from weightzoo.errors import CorruptShardError, NotFoundError
from weightzoo.storage.card import CARD, Recipe, read_card, write_card
from weightzoo.storage.dataset import check_file
from weightzoo.storage.fs import StorageOptions, join, redact, storage_step
from weightzoo.storage.ledger import (
    COMMITS,
    FAILURES,
    SHARDS,
    Ledger,
    is_shard_name,
    parse_commit,
    parse_failure,
)
from weightzoo.storage.listing import CommittedFile


@dataclass(frozen=True)
class Problem:
    """One bad thing verify found. Paths are relative to the dataset root."""

    ledger_file: str  # the ledger file that repair quarantines (or the card that repair rebuilds)
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
    uncommitted: list[str] = field(default_factory=list)  # shards no commit entry points at (not problems)
    card_rebuilt: bool = False  # repair rewrote an unreadable card from the commits' recipe

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shard(ledger: Ledger, entry: dict) -> None:
    """Read one commit entry's shard as every verified reader does; ``CorruptShardError`` says why."""
    path = ledger.abspath(entry["shard"])
    f = CommittedFile(path, path, entry["shard"], tuple(entry["ids"]), entry["rows"], entry["nbytes"],
                      entry["layout"], entry["crc32"])
    check_file(ledger.fs, f)


def _read_commits(ledger: Ledger, report: VerifyReport) -> tuple[list[tuple[str, dict]], list[str]]:
    """Every parsable commit entry (relative path, fields) in canonical order, and every entry file's name;
    unparsable ones are problems."""
    out, names = [], []
    for name, blob in ledger.raw_files(COMMITS):
        names.append(name)
        report.commits += 1
        rel = f"{COMMITS}/{name}"
        try:
            out.append((rel, parse_commit(blob)))
        except (ValueError, UnicodeDecodeError) as e:
            report.problems.append(Problem(rel, None, f"unreadable ledger file: {e}"))
    return sorted(out, key=lambda e: (e[1]["committed_at"], e[0])), names


def _check_commits(ledger: Ledger, entries: list[tuple[str, dict]], layout: str, report: VerifyReport) -> None:
    for rel, entry in entries:
        try:
            if layout and entry["layout"] != layout:
                raise CorruptShardError(
                    f"shard {entry['shard']} has layout {entry['layout']}, the dataset's is {layout} "
                    "(a dataset never mixes layouts)"
                )
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


def _card(ledger: Ledger, report: VerifyReport) -> Recipe | None:
    """The card, or None (absent, or unreadable: then a problem)."""
    try:
        return read_card(ledger)
    except CorruptShardError as e:
        report.problems.append(Problem(CARD, None, str(e)))
        return None


def _uncommitted(ledger: Ledger, entries: list[tuple[str, dict]], entry_names: list[str]) -> list[str]:
    """Shard files under ``shards/`` that no commit entry (parsable, or by its name) points at."""
    path = join(ledger.root, SHARDS)
    ledger.fs.invalidate_cache(path)
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in ledger.fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    referenced = {e["shard"].rsplit("/", 1)[-1] for _, e in entries}
    committed_names = {n.removesuffix(".json") + ".parquet" for n in entry_names}
    return [f"{SHARDS}/{n}" for n in names if is_shard_name(n) and n not in referenced | committed_names]


def rebuild_card(ledger: Ledger, entries: list[tuple[str, dict]]) -> str | None:
    """Rewrite the card from the recipe the commit entries record; None when done, else why it cannot be."""
    recipes = [e.get("recipe") for _, e in entries]
    if not recipes or any(r is None for r in recipes):
        return "some commit entries record no recipe (written before entries did)"
    distinct = {json.dumps(r, sort_keys=True) for r in recipes}
    if len(distinct) != 1:
        return f"the commit entries record {len(distinct)} different recipes"
    with storage_step(ledger.uri, f"rebuilding {CARD}"):
        write_card(ledger, Recipe(**recipes[0]))
    return None


def verify_dataset(dataset_uri: str, repair: bool = False, storage_options: StorageOptions = None) -> VerifyReport:
    """Check every ledger file, the card and every committed shard; with ``repair``, quarantine each bad
    ledger file and rebuild an unreadable card from the commits where they agree."""
    ledger = Ledger(dataset_uri, storage_options)
    if not ledger.exists():
        raise NotFoundError(f"no dataset at {redact(ledger.uri)}")
    report = VerifyReport(dataset=redact(ledger.uri))
    card = _card(ledger, report)
    entries, entry_names = _read_commits(ledger, report)
    layout = card.layout if card and card.layout else (entries[0][1]["layout"] if entries else "")
    _check_commits(ledger, entries, layout, report)
    _check_failures(ledger, report)
    report.uncommitted = _uncommitted(ledger, entries, entry_names)
    if repair:
        _repair(ledger, entries, report)
    return report


def _repair(ledger: Ledger, entries: list[tuple[str, dict]], report: VerifyReport) -> None:
    bad = {p.ledger_file for p in report.problems}
    for k, p in enumerate(report.problems):
        if p.ledger_file == CARD:  # rebuilt from the good entries only
            why = rebuild_card(ledger, [e for e in entries if e[0] not in bad])
            report.card_rebuilt = why is None
            if why:
                report.problems[k] = Problem(CARD, None, f"{p.reason}; not rebuilt: {why}")
            continue
        details = {"shard": p.shard} if p.shard else {}
        report.quarantined.append(ledger.quarantine(p.ledger_file, p.reason, **details).path)
