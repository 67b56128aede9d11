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

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from fsspec import AbstractFileSystem

from weightzoo.errors import CorruptShardError, NotFoundError
from weightzoo.storage.dataset import raise_bad, screen_files
from weightzoo.storage.fs import StorageOptions, is_local
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.listing import CommittedFile, committed_files, listing_problems, one_layout
from weightzoo.storage.shards import LayoutMismatchError, read_layout, shard_schema

SHARD_COLUMN = "shard"


def _check_files(fs: AbstractFileSystem, files: list[CommittedFile]) -> None:
    """Every file exists at its committed size: one listing per folder, not one request per file."""
    bad = listing_problems(fs, files, "")
    if bad:
        raise CorruptShardError(bad[0][1])


def _layout(fs: AbstractFileSystem, files: list[CommittedFile], uri: str) -> Layout:
    one_layout(files, uri)
    layout = read_layout(fs, files[0].path)
    if layout.fingerprint != files[0].layout:
        raise LayoutMismatchError(f"shard {files[0].shard} has layout {layout.fingerprint}, not {files[0].layout}")
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
        if f.partial:
            keep = (ds.field(SHARD_COLUMN) != f.shard) | ds.field("id").isin(list(f.ids))
            expr = keep if expr is None else expr & keep
    return expr


def dataset_schema(layout: Layout) -> pa.Schema:
    """The shard schema (its ``weightzoo.layout`` metadata included) plus the virtual ``shard`` column."""
    return shard_schema(layout).append(pa.field(SHARD_COLUMN, pa.string(), nullable=False))


def open_dataset(uri: str, storage_options: StorageOptions = None, verify: bool = False) -> ds.Dataset:
    """Exactly the visible rows of a dataset, as a pyarrow dataset (one row per committed id).

    Lazy: nothing but the ledger, one listing and one footer are read until it is scanned. Raises
    ``NotFoundError`` for a dataset with no committed rows, ``CorruptShardError`` for a committed
    shard that is missing or resized. A plain scan does not check CRC32s or ids (pyarrow reads the
    files itself); ``verify=True`` reads every shard once first, as ``Dataset`` reads do, and raises
    ``CorruptShardError`` naming the first shard that fails (see docs/READING.md).
    """
    ledger = Ledger(uri, storage_options)
    files = committed_files(ledger)
    if verify:
        raise_bad(screen_files(ledger, files, verify=True))
    return files_dataset(ledger.fs, files, uri)


def files_dataset(fs: AbstractFileSystem, files: list[CommittedFile], uri: str = "") -> ds.Dataset:
    """The pyarrow dataset of ``files`` (from ``committed_files``): one ledger read serves a whole plan."""
    if not files:
        raise NotFoundError(f"dataset {uri} has no committed rows")
    _check_files(fs, files)
    layout = _layout(fs, files, uri)
    dataset = ds.FileSystemDataset.from_paths(
        [f.path for f in files],
        schema=dataset_schema(layout),
        format=ds.ParquetFileFormat(),
        filesystem=arrow_filesystem(fs),
        partitions=[ds.field(SHARD_COLUMN) == f.shard for f in files],
    )
    expr = visible_filter(files)
    return dataset if expr is None else dataset.filter(expr)
