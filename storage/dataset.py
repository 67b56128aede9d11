"""Read a dataset: the committed rows of all committed shards, one row group at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from weightzoo.errors import CorruptShardError
from weightzoo.storage.fs import StorageOptions
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import CommitEntry, Ledger
from weightzoo.storage.shards import iter_shard, read_layout, shard_crc32


class Dataset:
    """The committed rows of a dataset URI. Uncommitted shards are invisible; layouts never mix."""

    def __init__(self, uri: str, storage_options: StorageOptions = None) -> None:
        self.ledger = Ledger(uri, storage_options)
        self.uri = self.ledger.uri
        self.fs = self.ledger.fs
        self.entries: list[CommitEntry] = [c for c in self.ledger.commits() if c.ids]
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
                raise ValueError(f"dataset {self.uri} has no committed rows")
            first = self.entries[0]
            if self.fs.size(self.ledger.abspath(first.shard)) != first.nbytes:
                raise CorruptShardError(f"shard {first.shard} is not the size its ledger entry says")
            self._layout = read_layout(self.fs, self.ledger.abspath(self.entries[0].shard))
        return self._layout

    def _check(self, entry: CommitEntry, verify: bool) -> str:
        path = self.ledger.abspath(entry.shard)
        size = self.fs.size(path)
        if size != entry.nbytes:
            raise CorruptShardError(f"shard {entry.shard} is {size} bytes, its ledger entry says {entry.nbytes}")
        if entry.layout != self.layout.fingerprint:
            raise ValueError(
                f"shard {entry.shard} has layout {entry.layout} but the dataset's is {self.layout.fingerprint}; "
                "datasets never mix layouts"
            )
        if verify:
            try:
                crc = shard_crc32(self.fs, path)
            except (OSError, pa.ArrowException) as e:
                raise CorruptShardError(f"shard {entry.shard} cannot be read: {e}") from e
            if crc != entry.crc32:
                raise CorruptShardError(f"shard {entry.shard} fails its checksum")
        return path

    def iter_batches(
        self, columns: Sequence[str] | None = None, weights: bool = True, verify: bool = False
    ) -> Iterator[tuple[pa.Table, np.ndarray | None]]:
        """Yield (metadata, (n, D) weights) per row group of committed rows, in commit order.

        ``verify=True`` checks each shard's content CRC32 first (one extra read); sizes are always checked.
        """
        for entry in self.entries:
            path = self._check(entry, verify)
            visible = None if len(entry.ids) == entry.rows else pa.array(entry.ids)
            for table, w in iter_shard(self.fs, path, columns, self.layout, weights):
                if visible is not None:
                    mask = pc.is_in(table.column("id"), value_set=visible)
                    table = table.filter(mask)
                    w = None if w is None else w[np.asarray(mask)]
                if table.num_rows:
                    yield table, w

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All committed rows' metadata (no weights) as one table."""
        parts = [t for t, _ in self.iter_batches(columns, weights=False)]
        return pa.concat_tables(parts) if parts else pa.table({})

    def row(self, item_id: str) -> tuple[dict, np.ndarray]:
        """One row's metadata and weights (reads only the shard holding it)."""
        for entry in self.entries:
            if item_id in entry.ids:
                path = self._check(entry, verify=False)
                for table, w in iter_shard(self.fs, path, None, self.layout):
                    ids = table.column("id").to_pylist()
                    if item_id in ids:
                        k = ids.index(item_id)
                        meta = {c: table.column(c)[k].as_py() for c in table.column_names}
                        meta["attributes"] = dict(meta["attributes"] or [])
                        meta["hparams"] = json.loads(meta["hparams"] or "{}")
                        return meta, w[k]
        raise KeyError(f"id {item_id!r} is not committed in {self.uri}")
