"""Shards: write-then-read equality, schema, layout refusal; on local disk and on moto S3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from weightzoo.storage.fs import atomic_write, filesystem
from weightzoo.storage.layout import Layout
from weightzoo.storage.shards import (
    WEIGHTS,
    LayoutMismatchError,
    RowMeta,
    iter_shard,
    read_layout,
    shard_schema,
    write_shard,
)


def _layout(dtype: str = "float16", dim: int = 1000) -> Layout:
    return Layout(("a.lora_A.weight", "a.lora_B.weight"), ((1, dim // 2), (dim // 2, 1)), dtype)


def _rows(n: int) -> list[RowMeta]:
    return [
        RowMeta(
            id=f"id-{i}",
            prompt="sks person",
            attributes={"colour": "red" if i % 2 else "blue"},
            base_model="b123",
            hparams={"rank": 1, "alpha": 27},
            loss=0.1 * i,
            steps=800,
            train_seconds=1.5,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_write_read_equality(dataset_root: str, dtype: str) -> None:
    layout = _layout(dtype)
    weights = torch.randn(37, layout.numel).to(layout.torch_dtype)
    fs, root = filesystem(dataset_root)
    path = f"{root}/shard.parquet"
    info = write_shard(fs, path, layout, _rows(37), weights, row_group_size=8)
    assert info.ids == tuple(f"id-{i}" for i in range(37)) and info.nbytes == fs.size(path)
    assert read_layout(fs, path) == layout

    metas, chunks = [], []
    for table, w in iter_shard(fs, path, expect_layout=layout):
        assert w.shape == (table.num_rows, layout.numel) and table.num_rows <= 8
        metas.append(table)
        chunks.append(layout.as_tensor(w))
    got = torch.cat(chunks)
    assert torch.equal(got.view(torch.uint8), weights.view(torch.uint8))
    ids = [i for t in metas for i in t.column("id").to_pylist()]
    assert ids == list(info.ids)
    first = metas[0].to_pylist()[1]
    assert first["attributes"] == [("colour", "red")] and json.loads(first["hparams"]) == {"alpha": 27, "rank": 1}
    assert first["layout"] == layout.fingerprint and first["steps"] == 800


def test_schema_and_encoding(tmp_path) -> None:
    layout = _layout()
    path = str(tmp_path / "s.parquet")
    write_shard(*filesystem(path), layout, _rows(4), np.zeros((4, layout.numel), np.float16))
    pf = pq.ParquetFile(path)
    assert pf.schema_arrow.remove_metadata() == shard_schema(layout).remove_metadata()
    assert pf.schema_arrow.field(WEIGHTS).type.byte_width == layout.nbytes
    col = pf.metadata.row_group(0).column(pf.metadata.num_columns - 1)
    assert col.path_in_schema == WEIGHTS
    assert "RLE_DICTIONARY" not in col.encodings and "PLAIN_DICTIONARY" not in col.encodings
    assert col.statistics is None or not col.statistics.has_min_max


def test_reading_refuses_other_layout(tmp_path) -> None:
    a, b = _layout(dim=1000), _layout(dim=1002)
    path = str(tmp_path / "s.parquet")
    write_shard(*filesystem(path), a, _rows(2), np.zeros((2, a.numel), np.float16))
    with pytest.raises(LayoutMismatchError, match=rf"has layout {a.fingerprint}.*expected {b.fingerprint}"):
        next(iter_shard(*filesystem(path), expect_layout=b))


def test_writer_rejects_wrong_width(tmp_path) -> None:
    layout = _layout()
    with pytest.raises(ValueError, match=r"weights must be \(n, 1000\) of float16"):
        write_shard(*filesystem(str(tmp_path / "s.parquet")), layout, _rows(2), np.zeros((2, 999), np.float16))
    assert _files(tmp_path) == []  # nothing partial left behind


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# A writer that hits a real "File too large" (EFBIG) from the kernel: RLIMIT_FSIZE caps its files at 64 KiB,
# and SIGXFSZ is ignored so the write fails instead of killing the process (what a full disk looks like).
_FULL_DISK_WRITER = """
import resource, signal, sys
import numpy as np
from weightzoo.storage.fs import filesystem
from weightzoo.storage.layout import Layout
from weightzoo.storage.shards import RowMeta, write_shard
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
layout = Layout(("w",), ((1000,),), "float16")
try:
    write_shard(*filesystem(sys.argv[1]), layout, [RowMeta(id=f"r{i}") for i in range(200)],
                np.ones((200, 1000), np.float16), row_group_size=16)
except OSError as e:
    print("FAILED", e.errno)
else:
    print("WROTE")
"""


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    import errno

    path = tmp_path / "shards" / "b0-0123456789ab.parquet"
    out = subprocess.run([sys.executable, "-c", _FULL_DISK_WRITER, str(path)], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["FAILED", str(errno.EFBIG)], out.stderr
    assert (tmp_path / "shards" / "_tmp").is_dir()  # where the temp was written...
    assert _files(tmp_path) == []  # ...and removed, with no shard appearing


def test_shard_temp_is_under_tmp_folder(tmp_path: Path) -> None:
    """While a shard is written its temp lives in shards/_tmp/, never next to the shards."""
    from weightzoo.storage.shards import ShardWriter

    layout = _layout()
    fs, _ = filesystem(str(tmp_path))
    path = str(tmp_path / "shards" / "b0-0123456789ab.parquet")
    with ShardWriter(fs, path, layout, row_group_size=2) as w:
        w.write(_rows(2), np.zeros((2, layout.numel), np.float16))
        assert [p.split("/", 2)[:2] for p in _files(tmp_path)] == [["shards", "_tmp"]]
    assert _files(tmp_path) == ["shards/b0-0123456789ab.parquet"]
    assert len(pq.read_table(path)) == 2 and len(set(pq.read_table(path).column("id").to_pylist())) == 2


def test_crc32_combine_matches_zlib() -> None:
    """The reader checks a row group's CRC in parts on several threads; joined, they equal zlib's."""
    import zlib

    from weightzoo.storage.shards import crc32_combine

    data = np.random.default_rng(1).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    for cut in (0, 1, 4096, 50_000, len(data)):
        a, b = data[:cut], data[cut:]
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)


def test_atomic_write_removes_its_temp_on_failure(tmp_path: Path) -> None:
    fs, _ = filesystem(str(tmp_path))
    target = tmp_path / "ledger" / "commits" / "x.json"
    with pytest.raises(RuntimeError, match="writer died"), atomic_write(fs, str(target)) as f:
        f.write(b'{"half": ')
        raise RuntimeError("writer died")
    assert _files(tmp_path) == []  # no temp sibling, no half file
    with atomic_write(fs, str(target)) as f:
        f.write(b"{}")
    assert _files(tmp_path) == ["ledger/commits/x.json"] and target.read_bytes() == b"{}"
