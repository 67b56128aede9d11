"""Shards: write-then-read equality, schema, layout refusal; on local disk and on moto S3."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from weightzoo.storage.fs import filesystem
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
    assert not list(tmp_path.iterdir())  # nothing partial left behind
