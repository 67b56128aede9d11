"""Parquet shards of flattened weights: one shard per fine-tune batch, immutable once written.

Weights live in one ``fixed_size_binary(D × itemsize)`` column of little-endian floats: it writes
~2x and reads ~4x faster than ``fixed_size_list<halffloat>`` and reads zero-copy into numpy/torch
(see docs/FORMAT.md). The layout travels in the schema metadata, so every shard is self-describing.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec import AbstractFileSystem

from weightzoo.errors import RecipeMismatchError
from weightzoo.storage.fs import atomic_write, is_local
from weightzoo.storage.layout import NUMPY_VIEW, Layout
from weightzoo.storage.retry import LostWriteError

try:  # ISA-L's CRC32 is bit-identical to zlib's and several times faster; used when the optional `isal` is installed
    from isal.isal_zlib import crc32 as weights_crc32
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32 as weights_crc32
CRC32_IMPL = getattr(weights_crc32, "__module__", None) or "zlib"  # which one, for benchmarks

LAYOUT_KEY = b"weightzoo.layout"
FORMAT_KEY = b"weightzoo.format"
FORMAT_VERSION = b"1"
WEIGHTS = "weights"
LOSS_HISTORY = "loss_history"
# Temp files live in an underscore folder next to the shards: pyarrow/pandas/polars directory reads skip
# "_"-prefixed paths, so a killed writer's leftover never breaks `read_table(shards/)`; gc removes it.
TMP_DIR = "_tmp"

# Everything about a row except its weights. One explicit schema, tested by write-then-read.
META_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("kind", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("attributes", pa.map_(pa.string(), pa.string())),
        pa.field("base_model", pa.string()),  # base-model fingerprint
        pa.field("layout", pa.string()),  # layout fingerprint
        pa.field("method", pa.string()),  # "lora", "orthogonal", ...
        pa.field("hparams", pa.string()),  # JSON of the resolved fine-tune config
        pa.field("loss", pa.float32()),
        pa.field("steps", pa.int32()),
        pa.field("train_seconds", pa.float32()),
        pa.field("created_at", pa.timestamp("ms", tz="UTC")),
        # One value per ``loss_window`` steps (hparams), the mean of that window: the row's training curve
        # in 4 bytes a window. Shards written before it have no such column; readers give null.
        pa.field(LOSS_HISTORY, pa.list_(pa.float32())),
    ]
)


class LayoutMismatchError(RecipeMismatchError):
    """Rows of different layouts were about to be mixed."""


@dataclass(frozen=True)
class RowMeta:
    """The metadata of one row (one fine-tuned model)."""

    id: str
    kind: str = "identity"
    prompt: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    base_model: str = ""
    method: str = "lora"
    hparams: dict[str, Any] = field(default_factory=dict)
    loss: float | None = None
    steps: int | None = None
    train_seconds: float | None = None
    created_at: datetime | None = None
    loss_history: Sequence[float] | None = None  # one mean per ``loss_window`` steps


@dataclass(frozen=True)
class ShardInfo:
    """What the ledger records to commit a shard: enough to check it is the file that was written."""

    path: str
    ids: tuple[str, ...]
    nbytes: int
    crc32: int
    layout: str


def shard_schema(layout: Layout) -> pa.Schema:
    return META_SCHEMA.append(pa.field(WEIGHTS, pa.binary(layout.nbytes), nullable=False)).with_metadata(
        {LAYOUT_KEY: layout.to_json().encode(), FORMAT_KEY: FORMAT_VERSION}
    )


def weights_array(layout: Layout, weights: np.ndarray | torch.Tensor) -> pa.FixedSizeBinaryArray:
    """Wrap an (n, D) array as a fixed-size-binary column without copying its bytes."""
    arr = layout.to_numpy(weights) if isinstance(weights, torch.Tensor) else np.ascontiguousarray(weights)
    if arr.ndim != 2 or arr.shape[1] != layout.numel or arr.dtype != NUMPY_VIEW[layout.dtype]:
        raise ValueError(
            f"weights must be (n, {layout.numel}) of {layout.dtype}; got {arr.shape} {arr.dtype}"
        )
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(layout.nbytes), len(arr), [None, pa.py_buffer(arr)])


def _meta_table(layout: Layout, rows: Sequence[RowMeta]) -> dict[str, pa.Array]:
    now = datetime.now(UTC)
    cols: dict[str, list] = {f.name: [] for f in META_SCHEMA}
    for r in rows:
        cols["id"].append(r.id)
        cols["kind"].append(r.kind)
        cols["prompt"].append(r.prompt)
        cols["attributes"].append(list(r.attributes.items()))
        cols["base_model"].append(r.base_model)
        cols["layout"].append(layout.fingerprint)
        cols["method"].append(r.method)
        cols["hparams"].append(json.dumps(r.hparams, sort_keys=True))
        cols["loss"].append(r.loss)
        cols["steps"].append(r.steps)
        cols["train_seconds"].append(r.train_seconds)
        cols["created_at"].append(r.created_at or now)
        cols[LOSS_HISTORY].append(None if r.loss_history is None else list(r.loss_history))
    return {f.name: pa.array(cols[f.name], type=f.type) for f in META_SCHEMA}


def temp_path(path: str) -> str:
    """Where a local shard is written before its rename: ``<dir>/_tmp/<name>.tmp-<hex>`` (same filesystem)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, TMP_DIR, f"{name}.tmp-{uuid.uuid4().hex[:12]}")


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


class ShardWriter:
    """Write one shard, row group by row group; the file appears (whole) at ``close()``.

    ``with ShardWriter(fs, path, layout) as w: w.write(rows, weights)`` then ``w.info``.
    The checksum is a CRC32 of the weights bytes in row order (a content checksum, independent of
    Parquet's encoding), computed on a second thread while pyarrow writes the same row group.
    Local disk: temp file under ``_tmp/``, fsync (``durable``), rename. Object stores: one upload,
    visible at close. Any failure (an exception in the ``with`` body, a full disk at close) removes
    the temp file or aborts the upload, so nothing partial is left.
    """

    def __init__(
        self,
        fs: AbstractFileSystem,
        path: str,
        layout: Layout,
        row_group_size: int = 128,
        compression: str | None = None,
        durable: bool = True,
    ) -> None:
        self.fs, self.path, self.layout, self.row_group_size = fs, path, layout, row_group_size
        self.durable = durable
        self.schema = shard_schema(layout)
        self._ids: list[str] = []
        self._crc = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-crc")
        self._local = is_local(fs)
        self._writer: pq.ParquetWriter | None = None
        self._aborted = False
        if self._local:
            self._tmp = temp_path(path)
            os.makedirs(os.path.dirname(self._tmp), exist_ok=True)
            sink: Any = self._tmp
        else:
            self._cm = atomic_write(fs, path)
            sink = self._cm.__enter__()
        meta_cols = [f.name for f in META_SCHEMA]
        try:
            self._writer = pq.ParquetWriter(
                sink,
                self.schema,
                compression=compression or "none",  # random-looking weights barely compress
                use_dictionary=meta_cols,  # never dictionary-encode the weights column
                write_statistics=meta_cols,  # min/max of 200 KB binaries is pure cost
                write_page_index=False,
                data_page_size=8 << 20,
            )
        except BaseException:
            self.abort()
            raise
        self.info: ShardInfo | None = None

    def write(self, rows: Sequence[RowMeta], weights: np.ndarray | torch.Tensor) -> None:
        if len(rows) != len(weights):
            raise ValueError(f"{len(rows)} rows but {len(weights)} weight vectors")
        cols = _meta_table(self.layout, rows)
        cols[WEIGHTS] = column = weights_array(self.layout, weights)
        crc = self._pool.submit(weights_crc32, column.buffers()[1], self._crc)  # drops the GIL
        assert self._writer is not None
        self._writer.write_table(pa.Table.from_pydict(cols, schema=self.schema), row_group_size=self.row_group_size)
        self._crc = crc.result()
        self._ids.extend(r.id for r in rows)

    def close(self) -> ShardInfo:
        """Finish the file and make it appear at ``path``; on any failure nothing partial is left."""
        try:
            assert self._writer is not None
            self._writer.close()
            self._pool.shutdown()
            if self._local:
                nbytes = self._publish_temp()
            else:
                self._cm.__exit__(None, None, None)
                nbytes = self.fs.size(self.path)
        except BaseException:
            self.abort()
            raise
        self.info = ShardInfo(self.path, tuple(self._ids), nbytes, self._crc, self.layout.fingerprint)
        return self.info

    def _publish_temp(self) -> int:
        """fsync (``durable``) and rename the temp file onto ``path``; its size. A temp file removed under us
        (a racing gc) is a ``LostWriteError``, which the retry policy retries (the batch writes again)."""
        try:
            if self.durable:
                _fsync(self._tmp)
            os.replace(self._tmp, self.path)
            return os.path.getsize(self.path)
        except FileNotFoundError as e:
            raise LostWriteError(f"shard {os.path.basename(self.path)} vanished while being written ({e})") from e

    def abort(self) -> None:
        """Drop the partial file (local temp file removed; an S3 upload is never completed). Idempotent."""
        if self._aborted:
            return
        self._aborted = True
        self._pool.shutdown()
        try:
            if self._writer is not None:
                with suppress(Exception):  # closing a half-written file may fail again (disk still full)
                    self._writer.close()
        finally:
            if self._local:
                _remove(self._tmp)
            else:
                self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_CRC_POLY = 0xEDB88320  # zlib's CRC-32, bit-reflected


def _multmodp(a: int, b: int) -> int:
    """a·b modulo the CRC-32 polynomial (bit-reflected, as zlib's ``multmodp``)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _x_pow_2k() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X2N = _x_pow_2k()  # x^(2^k) mod p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32 of A‖B from crc32(A), crc32(B) and len(B), as zlib's ``crc32_combine`` (which Python lacks).

    Lets the CRC of one buffer be computed in parts on several threads; costs microseconds.
    """
    p, k = 1 << 31, 3  # x^0; 2^3 = 8 bits per byte
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 31], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_crc32(fs: AbstractFileSystem, path: str) -> int:
    """The content checksum ``ShardWriter`` recorded: CRC32 of all weights bytes in row order."""
    crc = 0
    with open_parquet(fs, path) as pf:
        for i in range(pf.num_row_groups):
            col = pf.read_row_group(i, columns=[WEIGHTS]).column(WEIGHTS)
            for chunk in col.chunks:
                crc = weights_crc32(weights_numpy(_layout_of(pf, path), chunk), crc)
    return crc


def write_shard(
    fs: AbstractFileSystem,
    path: str,
    layout: Layout,
    rows: Sequence[RowMeta],
    weights: np.ndarray | torch.Tensor,
    row_group_size: int = 128,
    compression: str | None = None,
    durable: bool = True,
) -> ShardInfo:
    """Write a whole batch as one shard and return what the ledger needs to commit it."""
    with ShardWriter(fs, path, layout, row_group_size, compression, durable) as w:
        w.write(rows, weights)
    assert w.info is not None
    return w.info


@contextmanager
def open_parquet(fs: AbstractFileSystem, path: str) -> Iterator[pq.ParquetFile]:
    """A ParquetFile: memory-mapped for local files (reads at page-cache speed), fsspec otherwise."""
    if is_local(fs):
        pf = pq.ParquetFile(path, memory_map=True)
        try:
            yield pf
        finally:
            pf.close()
    else:
        with fs.open(path, "rb") as f:
            yield pq.ParquetFile(f)


def shard_layout(pf: pq.ParquetFile, path: str) -> Layout:
    """The layout in an open shard's schema metadata; ``ValueError`` if it is not a weightzoo shard."""
    return _layout_of(pf, path)


def _layout_of(pf: pq.ParquetFile, path: str) -> Layout:
    meta = pf.schema_arrow.metadata or {}
    if LAYOUT_KEY not in meta:
        raise ValueError(f"{path} is not a weightzoo shard (no layout in its schema metadata)")
    return Layout.from_json(meta[LAYOUT_KEY])


def read_layout(fs: AbstractFileSystem, path: str) -> Layout:
    """The layout stored in a shard's schema metadata (reads only the footer)."""
    with open_parquet(fs, path) as pf:
        return _layout_of(pf, path)


def weights_numpy(layout: Layout, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, D) numpy view of a weights column (zero-copy for a single chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if len(chunks) != 1:
        return np.concatenate([weights_numpy(layout, c) for c in chunks]) if chunks else np.empty((0, layout.numel))
    arr = chunks[0]
    dtype = NUMPY_VIEW[layout.dtype]
    buf = arr.buffers()[1]
    out = np.frombuffer(buf, dtype=dtype, count=len(arr) * layout.numel, offset=arr.offset * layout.nbytes)
    return out.reshape(len(arr), layout.numel)


def iter_shard(
    fs: AbstractFileSystem,
    path: str,
    columns: Sequence[str] | None = None,
    expect_layout: Layout | None = None,
    weights: bool = True,
) -> Iterator[tuple[pa.Table, np.ndarray | None]]:
    """Yield (metadata table, (n, D) weights) per row group; refuses a shard of another layout.

    Bounded memory: one row group at a time. ``weights=False`` skips reading the weights column.
    """
    with open_parquet(fs, path) as pf:
        layout = _layout_of(pf, path)
        if expect_layout is not None and layout != expect_layout:
            raise LayoutMismatchError(
                f"{path} has layout {layout.fingerprint} ({layout.numel} values, {layout.dtype}); "
                f"expected {expect_layout.fingerprint} ({expect_layout.numel} values, {expect_layout.dtype})"
            )
        yield from row_groups(pf, layout, columns, weights)


def row_groups(
    pf: pq.ParquetFile, layout: Layout, columns: Sequence[str] | None = None, weights: bool = True
) -> Iterator[tuple[pa.Table, np.ndarray | None]]:
    """(metadata table, (n, D) weights or None) per row group of an open shard, one at a time."""
    cols = list(columns) if columns is not None else [f.name for f in META_SCHEMA]
    if weights and WEIGHTS not in cols:
        cols.append(WEIGHTS)
    stored = set(pf.schema_arrow.names)
    missing = [c for c in cols if c not in stored and c in META_SCHEMA.names]  # a column added after the shard
    for i in range(pf.num_row_groups):
        table = pf.read_row_group(i, columns=[c for c in cols if c not in missing], use_threads=True)
        for name in missing:  # null, in the schema's type and the order asked for
            table = table.add_column(cols.index(name), META_SCHEMA.field(name), pa.nulls(len(table), META_SCHEMA.field(name).type))
        w = weights_numpy(layout, table.column(WEIGHTS)) if weights else None
        yield (table.drop_columns([WEIGHTS]) if weights else table), w
