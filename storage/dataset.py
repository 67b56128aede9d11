"""Read a dataset: the committed rows of all committed shards, one row group at a time.

Every read of a committed shard goes through ``verified_shard_batches``: it checks the shard's size
and footer layout against its commit entry, and for reads of weights also its CRC32, computed on
worker threads while the next row group is read (the CRC releases the GIL), so no second read is
needed. A shard that ends with the wrong CRC raises ``CorruptShardError``: a corrupt shard never
silently completes an export, a subspace fit or a weight-diffusion training run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from weightzoo.errors import CorruptShardError, NotFoundError
from weightzoo.storage.fs import StorageOptions
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.listing import CommittedFile, committed_files, dataset_layout, listing_problems
from weightzoo.storage.shards import (
    LayoutMismatchError,
    crc32_combine,
    open_parquet,
    row_groups,
    shard_layout,
    weights_crc32,
)

__all__ = ["CorruptShardError", "Dataset", "check_file", "check_files", "screen_files", "verified_shard_batches"]


_CRC_THREADS = max(1, min(4, os.cpu_count() or 1))
_CRC_SPLIT = 4 << 20  # split a row group's bytes across threads above this size


class _RunningCrc:
    """CRC32 of a sequence of buffers, computed on worker threads while the caller reads the next one.

    Each buffer is split into one part per thread (the CRC releases the GIL) and the parts' CRCs are
    joined with ``crc32_combine``. At most one buffer is in flight, so memory stays at two row groups.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(_CRC_THREADS, thread_name_prefix="shard-verify")
        self._parts: list[tuple[Future[int], int]] = []
        self._value = 0

    def add(self, w: np.ndarray) -> None:
        self.value()  # fold in the previous buffer first
        data = memoryview(np.ascontiguousarray(w)).cast("B")
        step = max(-(-len(data) // _CRC_THREADS), _CRC_SPLIT)
        self._parts = [
            (self._pool.submit(weights_crc32, data[i : i + step]), len(data[i : i + step]))
            for i in range(0, len(data), step)
        ]

    def value(self) -> int:
        for part, n in self._parts:
            self._value = crc32_combine(self._value, part.result(), n)
        self._parts = []
        return self._value

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _check_size(fs: AbstractFileSystem, path: str, name: str, nbytes: int) -> None:
    try:
        size = fs.size(path)
    except FileNotFoundError as e:
        raise CorruptShardError(f"shard {name} is missing (its commit entry points at it)") from e
    if size != nbytes:
        raise CorruptShardError(f"shard {name} is {size} bytes, its ledger entry says {nbytes}")


def verified_shard_batches(
    fs: AbstractFileSystem,
    path: str,
    name: str,
    *,
    nbytes: int,
    crc32: int | None,
    fingerprint: str,
    visible: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    layout: Layout | None = None,
    weights: bool = True,
    verify: bool | None = None,
) -> Iterator[tuple[pa.Table, np.ndarray | None]]:
    """The one reader of a committed shard: (metadata, (n, D) weights or None) per row group.

    Checks what the commit entry says: size (always), the footer's layout ``fingerprint``, and the CRC32
    of all weights bytes in row order (``verify``, default: when ``weights`` are read; ``crc32=None``
    means no checksum is known). The CRC verdict comes when the shard ends, so a caller that fails on
    the exception never completes with a corrupt shard's rows. ``visible``: yield only those ids (an
    entry that shares a shard with an earlier commit); ``layout``: refuse a shard of another layout.
    """
    verify = (weights if verify is None else verify) and crc32 is not None
    _check_size(fs, path, name, nbytes)
    try:
        with open_parquet(fs, path) as pf:
            found = _layout_in(pf, path, name)
            if found.fingerprint != fingerprint:
                raise CorruptShardError(
                    f"shard {name} has layout {found.fingerprint} in its footer, its ledger entry says {fingerprint}"
                )
            if layout is not None and found != layout:
                raise LayoutMismatchError(f"shard {name} has layout {found.fingerprint}, expected {layout.fingerprint}")
            crc = _RunningCrc() if verify else None
            try:
                yield from _visible_groups(row_groups(pf, found, columns, weights or verify), visible, weights, crc)
                if crc is not None and crc.value() != crc32:
                    raise CorruptShardError(
                        f"shard {name} fails its checksum (CRC32 {crc.value():#010x}, its ledger entry says "
                        f"{crc32:#010x}): run weightzoo verify --repair"
                    )
            finally:
                if crc is not None:
                    crc.close()
    except pa.ArrowException as e:  # a damaged footer or page header
        raise CorruptShardError(f"shard {name} cannot be read: {e}") from e


def check_file(fs: AbstractFileSystem, f: CommittedFile) -> None:
    """Read one committed shard as ``Dataset`` reads do (size, footer layout, CRC32 of every row) and check
    its ids against the commit entry: the recorded row count, every committed id present, none twice."""
    ids: list[str] = []
    batches = verified_shard_batches(fs, f.path, f.shard, nbytes=f.nbytes, crc32=f.crc32, fingerprint=f.layout,
                                     columns=["id"], weights=False, verify=True)
    for table, _ in batches:
        ids.extend(table.column("id").to_pylist())
    if len(ids) != f.rows:
        raise CorruptShardError(f"shard {f.shard} has {len(ids)} rows, its ledger entry says {f.rows}")
    missing = set(f.ids) - set(ids)
    if missing:
        raise CorruptShardError(f"shard {f.shard} lacks {len(missing)} ids its ledger entry commits")
    if len(set(ids)) != len(ids):
        raise CorruptShardError(f"shard {f.shard} holds {len(ids) - len(set(ids))} id(s) twice")


def check_files(fs: AbstractFileSystem, files: Sequence[CommittedFile]) -> list[tuple[CommittedFile, str]]:
    """The files that fail ``check_file``, each with why (empty when every file is what its entry says)."""
    bad = []
    for f in files:
        try:
            check_file(fs, f)
        except CorruptShardError as e:
            bad.append((f, str(e)))
    return bad


def screen_files(ledger: Ledger, files: Sequence[CommittedFile], verify: bool) -> list[tuple[CommittedFile, str]]:
    """The files that must not be handed out, each with why, as ``verify`` would judge them: another layout
    than the dataset's, missing or resized (one listing, no reads); with ``verify``, also every other file
    read once (footer layout, CRC32, ids). What ``weightzoo files`` and ``publish`` leave out or refuse."""
    bad = listing_problems(ledger.fs, files, dataset_layout(ledger, files))
    if verify:
        named = {f for f, _ in bad}
        bad += check_files(ledger.fs, [f for f in files if f not in named])
    order = {f: k for k, f in enumerate(files)}
    return sorted(bad, key=lambda b: order[b[0]])


def raise_bad(bad: Sequence[tuple[CommittedFile, str]], hint: str = "") -> None:
    """Refuse to hand out rows when any file failed its check: one line naming the first bad shard."""
    if bad:
        more = f" (and {len(bad) - 1} more bad shard(s))" if len(bad) > 1 else ""
        raise CorruptShardError(f"{bad[0][1]}{more}; run weightzoo verify --repair{hint}")


def footer_layout(fs: AbstractFileSystem, f: CommittedFile) -> Layout:
    """The layout in a committed shard's footer, checked against its entry's fingerprint: what a listing may
    hand a reader to decode the rows with. ``CorruptShardError`` for an unreadable footer or another layout."""
    try:
        layout = _footer_layout(fs, f.path, f.shard)
    except FileNotFoundError as e:
        raise CorruptShardError(f"committed shard {f.shard} is missing") from e
    except pa.ArrowException as e:
        raise CorruptShardError(f"shard {f.shard} cannot be read: {e}") from e
    if layout.fingerprint != f.layout:
        raise CorruptShardError(
            f"shard {f.shard} has layout {layout.fingerprint} in its footer, its ledger entry says {f.layout}"
        )
    return layout


def _footer_layout(fs: AbstractFileSystem, path: str, name: str) -> Layout:
    """The layout in a committed shard's footer; a footer without one means the file is not the shard."""
    with open_parquet(fs, path) as pf:
        return _layout_in(pf, path, name)


def _layout_in(pf: pq.ParquetFile, path: str, name: str) -> Layout:
    try:
        return shard_layout(pf, path)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptShardError(f"shard {name} has no readable layout in its footer: {e}") from e


def _visible_groups(
    groups: Iterator[tuple[pa.Table, np.ndarray | None]],
    visible: Sequence[str] | None,
    weights: bool,
    crc: _RunningCrc | None,
) -> Iterator[tuple[pa.Table, np.ndarray | None]]:
    """Feed every row group's weights to the checksum (all rows), then yield only the visible rows."""
    wanted = None if visible is None else pa.array(list(visible), pa.string())
    for table, w in groups:
        if crc is not None and w is not None:
            crc.add(w)
        w = w if weights else None
        if wanted is not None:
            mask = pc.is_in(table.column("id"), value_set=wanted)
            table = table.filter(mask)
            w = None if w is None else w[np.asarray(mask)]
        if table.num_rows:
            yield table, w


class Dataset:
    """The committed rows of a dataset URI. Uncommitted shards are invisible; layouts never mix."""

    def __init__(self, uri: str, storage_options: StorageOptions = None) -> None:
        self.ledger = Ledger(uri, storage_options)
        self.uri = self.ledger.uri
        self.fs = self.ledger.fs
        self.entries: list[CommittedFile] = committed_files(self.ledger)
        self._layout: Layout | None = None

    def __len__(self) -> int:
        return sum(len(c.ids) for c in self.entries)

    @property
    def ids(self) -> list[str]:
        return [i for c in self.entries for i in c.ids]

    @property
    def layout(self) -> Layout:
        """The one layout of every committed shard (read from the first shard's footer)."""
        if self._layout is None:
            if not self.entries:
                raise NotFoundError(f"dataset {self.uri} has no committed rows")
            first = self.entries[0]
            _check_size(self.fs, first.path, first.shard, first.nbytes)
            try:
                self._layout = _footer_layout(self.fs, first.path, first.shard)
            except pa.ArrowException as e:
                raise CorruptShardError(f"shard {first.shard} cannot be read: {e}") from e
        return self._layout

    def _batches(
        self, entry: CommittedFile, columns: Sequence[str] | None, weights: bool, verify: bool | None
    ) -> Iterator[tuple[pa.Table, np.ndarray | None]]:
        if entry.layout != self.layout.fingerprint:
            raise LayoutMismatchError(
                f"shard {entry.shard} has layout {entry.layout} but the dataset's is {self.layout.fingerprint}; "
                "datasets never mix layouts"
            )
        return verified_shard_batches(
            self.fs,
            entry.path,
            entry.shard,
            nbytes=entry.nbytes,
            crc32=entry.crc32,
            fingerprint=entry.layout,
            visible=entry.ids if entry.partial else None,
            columns=columns,
            layout=self.layout,
            weights=weights,
            verify=verify,
        )

    def iter_batches(
        self, columns: Sequence[str] | None = None, weights: bool = True, verify: bool | None = None
    ) -> Iterator[tuple[pa.Table, np.ndarray | None]]:
        """Yield (metadata, (n, D) weights) per row group of committed rows, in commit order.

        Sizes are always checked. ``verify`` (default: on when weights are read) checks each shard's
        CRC32 as it is read, raising ``CorruptShardError`` at the end of a corrupt shard;
        ``weights=False`` reads check size only unless ``verify=True`` (which then reads the weights).
        """
        for entry in self.entries:
            yield from self._batches(entry, columns, weights, verify)

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All committed rows' metadata (no weights) as one table."""
        parts = [t for t, _ in self.iter_batches(columns, weights=False)]
        return pa.concat_tables(parts) if parts else pa.table({})

    def row(self, item_id: str) -> tuple[dict, np.ndarray]:
        """One row's metadata and weights. Reads the whole shard holding it, to check its CRC32 first."""
        entry = next((e for e in self.entries if item_id in e.ids), None)
        if entry is None:
            raise NotFoundError(f"id {item_id!r} is not committed in {self.uri}")
        found: tuple[dict, np.ndarray] | None = None
        for table, w in self._batches(entry, None, True, True):
            ids = table.column("id").to_pylist()
            if found is None and item_id in ids:
                k = ids.index(item_id)
                meta = {c: table.column(c)[k].as_py() for c in table.column_names}
                meta["attributes"] = dict(meta["attributes"] or [])
                meta["hparams"] = json.loads(meta["hparams"] or "{}")
                assert w is not None
                found = meta, w[k]
        if found is None:
            raise CorruptShardError(f"shard {entry.shard} has no row {item_id!r}, though its ledger entry lists it")
        return found
