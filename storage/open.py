"""A dataset's committed rows as one ``pyarrow.dataset.Dataset``, for every Arrow-speaking tool.

DuckDB, polars, pandas and Hugging Face ``datasets`` all read a pyarrow dataset directly, so
``open_dataset`` is the one way in for them: it lists the ledger, keeps only committed shards, and
hides the rows an entry does not make visible (the losing copies of a duplicate-commit race). Orphan
shards and temporary files are never listed, because only ledger entries name files.

The extra ``shard`` column (the shard's path relative to the dataset root) is virtual: pyarrow fills
it from each file's partition expression, nothing is stored. It exists because a filter can only name
columns, and hiding a race's losing copies needs "this id, but only in that file". Per file, pyarrow
simplifies the filter against that file's ``shard`` value, so files with nothing hidden are scanned
unfiltered (no per-batch cost). Local files are memory-mapped (zero-copy reads); remote ones go
through fsspec, the same filesystem (and credentials) as the rest of weightzoo.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from fsspec import AbstractFileSystem

from weightzoo.errors import CorruptShardError, NotFoundError
from weightzoo.storage.fs import StorageOptions, is_local
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import CommitEntry, Ledger
from weightzoo.storage.shards import LayoutMismatchError, read_layout, shard_schema

SHARD_COLUMN = "shard"


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


def _file(ledger: Ledger, entry: CommitEntry) -> CommittedFile:
    path = ledger.abspath(entry.shard)
    uri = path if is_local(ledger.fs) else ledger.fs.unstrip_protocol(path)
    return CommittedFile(uri, path, entry.shard, entry.ids, entry.rows, entry.nbytes, entry.layout)


def committed_files(uri: str, storage_options: StorageOptions = None) -> list[CommittedFile]:
    """The committed shards that make at least one id visible, in the ledger's canonical order."""
    ledger = Ledger(uri, storage_options)
    return [_file(ledger, c) for c in ledger.commits() if c.ids]


def _check_files(fs: AbstractFileSystem, files: list[CommittedFile]) -> None:
    """Every file exists at its committed size: one listing per folder, not one request per file."""
    sizes: dict[str, int] = {}
    for folder in sorted({posixpath.dirname(f.path) for f in files}):
        fs.invalidate_cache(folder)
        sizes.update({d["name"]: d["size"] for d in fs.ls(folder, detail=True)})
    for f in files:
        size = sizes.get(f.path)
        if size is None:
            raise CorruptShardError(f"committed shard {f.shard} is missing")
        if size != f.nbytes:
            raise CorruptShardError(f"shard {f.shard} is {size} bytes, its ledger entry says {f.nbytes}")


def _layout(fs: AbstractFileSystem, files: list[CommittedFile]) -> Layout:
    layout = read_layout(fs, files[0].path)
    other = next((f for f in files if f.layout != layout.fingerprint), None)
    if other is not None:
        raise LayoutMismatchError(f"shard {other.shard} has layout {other.layout}, not {layout.fingerprint}")
    return layout


def arrow_filesystem(fs: AbstractFileSystem) -> pafs.FileSystem:
    """pyarrow's own memory-mapped local filesystem (zero-copy); any other fsspec filesystem wrapped."""
    if is_local(fs):
        return pafs.LocalFileSystem(use_mmap=True)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def visible_filter(files: list[CommittedFile]) -> ds.Expression | None:
    """Keep, in each file that hides rows, only its visible ids; None when no file hides any."""
    expr = None
    for f in files:
        if len(f.ids) < f.rows:
            keep = (ds.field(SHARD_COLUMN) != f.shard) | ds.field("id").isin(list(f.ids))
            expr = keep if expr is None else expr & keep
    return expr


def dataset_schema(layout: Layout) -> pa.Schema:
    """The shard schema (its ``weightzoo.layout`` metadata included) plus the virtual ``shard`` column."""
    return shard_schema(layout).append(pa.field(SHARD_COLUMN, pa.string(), nullable=False))


def open_dataset(uri: str, storage_options: StorageOptions = None) -> ds.Dataset:
    """Exactly the visible rows of a dataset, as a pyarrow dataset (one row per committed id).

    Lazy: nothing but the ledger, one listing and one footer are read until it is scanned. Raises
    ``NotFoundError`` for a dataset with no committed rows, ``CorruptShardError`` for a committed
    shard that is missing or resized.
    """
    ledger = Ledger(uri, storage_options)
    return files_dataset(ledger.fs, [_file(ledger, c) for c in ledger.commits() if c.ids], ledger.uri)


def files_dataset(fs: AbstractFileSystem, files: list[CommittedFile], uri: str = "") -> ds.Dataset:
    """The pyarrow dataset of ``files`` (from ``committed_files``): one ledger read serves a whole plan."""
    if not files:
        raise NotFoundError(f"dataset {uri} has no committed rows")
    _check_files(fs, files)
    layout = _layout(fs, files)
    dataset = ds.FileSystemDataset.from_paths(
        [f.path for f in files],
        schema=dataset_schema(layout),
        format=ds.ParquetFileFormat(),
        filesystem=arrow_filesystem(fs),
        partitions=[ds.field(SHARD_COLUMN) == f.shard for f in files],
    )
    expr = visible_filter(files)
    return dataset if expr is None else dataset.filter(expr)
