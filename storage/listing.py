"""The one listing of a dataset's committed shards: what every reader (``Dataset``, ``open_dataset``,
``publish``, ``weightzoo files``, the subspace fit) reads, and nothing else.

The ledger names the files; a glob of ``shards/`` would also see orphan shards and the losing copies of a
duplicate-commit race. Each ``CommittedFile`` carries what a reader needs to check the file against its
commit entry (size, layout fingerprint, CRC32, ids) without another ledger read.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from fsspec import AbstractFileSystem

from weightzoo.errors import CorruptShardError
from weightzoo.storage.card import read_card
from weightzoo.storage.fs import StorageOptions, is_local
from weightzoo.storage.ledger import CommitEntry, Ledger
from weightzoo.storage.shards import LayoutMismatchError


@dataclass(frozen=True)
class CommittedFile:
    """One committed shard as a reader sees it: where it is and which of its ids are visible."""

    uri: str  # what a reader opens: an absolute local path, or a full URL (s3://bucket/...)
    path: str  # the same file for the dataset's fsspec filesystem (no protocol)
    shard: str  # relative to the dataset root, e.g. shards/<batch>-<token>.parquet
    ids: tuple[str, ...]  # visible ids; fewer than ``rows`` where another entry committed some first
    rows: int
    nbytes: int
    layout: str  # layout fingerprint
    crc32: int | None = None  # the ledger's checksum of all weights bytes; None: size check only

    @property
    def partial(self) -> bool:
        """Whether the file holds rows another entry made visible first (a reader must filter them out)."""
        return len(self.ids) < self.rows


def committed_file(ledger: Ledger, entry: CommitEntry) -> CommittedFile:
    path = ledger.abspath(entry.shard)
    uri = path if is_local(ledger.fs) else ledger.fs.unstrip_protocol(path)
    return CommittedFile(uri, path, entry.shard, entry.ids, entry.rows, entry.nbytes, entry.layout, entry.crc32)


def committed_files(dataset: Ledger | str, storage_options: StorageOptions = None) -> list[CommittedFile]:
    """The committed shards that make at least one id visible, in the ledger's canonical order (one read)."""
    ledger = dataset if isinstance(dataset, Ledger) else Ledger(dataset, storage_options)
    return [committed_file(ledger, c) for c in ledger.commits() if c.ids]


def one_layout(files: Sequence[CommittedFile], uri: str) -> str:
    """The layout fingerprint every file shares; ``LayoutMismatchError`` naming a file that differs."""
    if not files:
        return ""
    other = next((f for f in files if f.layout != files[0].layout), None)
    if other is not None:
        raise LayoutMismatchError(
            f"dataset {uri} mixes layouts: shard {other.shard} has {other.layout}, shard {files[0].shard} "
            f"has {files[0].layout}; datasets never mix layouts (run weightzoo verify)"
        )
    return files[0].layout


def dataset_layout(ledger: Ledger, files: Sequence[CommittedFile]) -> str:
    """The dataset's one layout fingerprint, as ``verify`` judges it: the card's (fixed at the first commit),
    else the first entry's. Not "the first file's": a shard of another layout copied in with a forged entry
    may sort first, and a listing must never take its layout for the dataset's."""
    try:
        card = read_card(ledger)
    except CorruptShardError:  # verify reports the card; the entries still say which layout is the dataset's
        card = None
    if card is not None and card.layout:
        return card.layout
    return files[0].layout if files else ""


def listing_problems(fs: AbstractFileSystem, files: Sequence[CommittedFile], layout: str) -> list[tuple[CommittedFile, str]]:
    """The files a plain listing must not hand out, each with why: an entry of another layout than
    ``layout``, a shard that is missing or not at its committed size. One listing per folder, no file read."""
    sizes: dict[str, int] = {}
    for folder in sorted({posixpath.dirname(f.path) for f in files}):
        fs.invalidate_cache(folder)
        with contextlib.suppress(FileNotFoundError):  # shards/ itself gone: every file in it is missing
            sizes.update({d["name"]: d["size"] for d in fs.ls(folder, detail=True)})
    bad = []
    for f in files:
        size = sizes.get(f.path)
        if layout and f.layout != layout:
            bad.append((f, f"shard {f.shard} has layout {f.layout}, the dataset's is {layout} "
                           "(a dataset never mixes layouts)"))
        elif size is None:
            bad.append((f, f"committed shard {f.shard} is missing"))
        elif size != f.nbytes:
            bad.append((f, f"shard {f.shard} is {size} bytes, its ledger entry says {f.nbytes}"))
    return bad
