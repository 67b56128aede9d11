"""Ledger: commit is the ledger entry; crashes leave nothing visible; ids commit exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shard_writer_proc import rows_for

from weightzoo.storage.dataset import CorruptShardError, Dataset
from weightzoo.storage.fs import UnsafeIdError
from weightzoo.storage.ledger import Ledger

WRITER = str(Path(__file__).parent / "shard_writer_proc.py")
DIM = 64


def _writer(dataset: str, batch: str, n: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WRITER, dataset, batch, str(n), str(DIM), *flags], stdout=subprocess.PIPE, text=True
    )


def _rows_by_id(ds: Dataset) -> dict[str, np.ndarray]:
    out = {}
    for table, w in ds.iter_batches():
        for k, i in enumerate(table.column("id").to_pylist()):
            assert i not in out, f"{i} read twice"
            out[i] = w[k].copy()
    return out


def test_kill_before_commit_then_rerun(dataset_root: str) -> None:
    proc = _writer(dataset_root, "b0", 10, "--hang-before-commit")
    assert proc.stdout.readline().strip() == "WRITTEN"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    ledger = Ledger(dataset_root)
    assert ledger.fs.ls(f"{ledger.root}/shards")  # the orphan shard is there...
    assert len(Dataset(dataset_root)) == 0  # ...but nothing is visible
    ids = [f"b0-{i}" for i in range(10)]
    assert ledger.pending(ids) == ids

    rerun = _writer(dataset_root, "b0", 10)
    assert rerun.communicate(timeout=120)[0].split() == ["WRITTEN", "COMMITTED"]
    again = _writer(dataset_root, "b0", 10)  # a rerun of a committed batch commits nothing new
    assert again.communicate(timeout=120)[0].split() == ["WRITTEN", "COMMITTED"]

    ds = Dataset(dataset_root)
    assert len(ds.entries) == 1 and sorted(ds.ids) == sorted(ids)
    rows = _rows_by_id(ds)
    _, expected = rows_for("b0", 10, DIM)
    assert all(np.array_equal(rows[f"b0-{i}"], expected[i]) for i in range(10))
    assert Ledger(dataset_root).pending(ids) == []


def test_concurrent_writers_do_not_clobber(dataset_root: str) -> None:
    procs = [_writer(dataset_root, f"c{k}", 6) for k in range(3)]
    for p in procs:
        assert p.communicate(timeout=180)[0].split() == ["WRITTEN", "COMMITTED"]
    rows = _rows_by_id(Dataset(dataset_root))
    assert sorted(rows) == sorted(f"c{k}-{i}" for k in range(3) for i in range(6))
    for k in range(3):
        _, expected = rows_for(f"c{k}", 6, DIM)
        assert all(np.array_equal(rows[f"c{k}-{i}"], expected[i]) for i in range(6))


def test_same_id_never_visible_twice(tmp_path: Path) -> None:
    """Two attempts at one batch both write shards; racing commits still leave each id visible once."""
    from weightzoo.storage.layout import Layout
    from weightzoo.storage.shards import write_shard

    uri = str(tmp_path / "ds")
    ledger = Ledger(uri)
    layout = Layout(("w",), ((DIM,),), "float16")
    rows, w = rows_for("r", 4, DIM)
    first = write_shard(ledger.fs, ledger.new_shard_path("r"), layout, rows, w)
    second = write_shard(ledger.fs, ledger.new_shard_path("r"), layout, rows[1:], w[1:] + 1)
    # simulate the race: both writers read the commits before either entry existed
    ledger.commits = lambda: []  # type: ignore[method-assign]
    assert ledger.commit("r", first) is not None and ledger.commit("r", second) is not None
    ds = Dataset(uri)
    assert sorted(ds.ids) == ["r-0", "r-1", "r-2", "r-3"]
    rows_seen = _rows_by_id(ds)
    assert np.array_equal(rows_seen["r-1"], w[1])  # the earlier commit wins, for every reader


def test_failures_and_pending(dataset_root: str) -> None:
    ledger = Ledger(dataset_root)
    ledger.record_failures("b1", [("x", "image 0.png is not a decodable image"), ("y", "loss became NaN at step 3")])
    ledger.record_failures("b1", [("x", "image 0.png is not a decodable image")])
    failed = ledger.failed()
    assert failed["x"].attempt == 2 and failed["y"].reason == "loss became NaN at step 3"
    assert ledger.pending(["x", "y", "z"]) == ["x", "y", "z"]
    assert ledger.pending(["x", "y", "z"], include_failed=False) == ["z"]


def test_truncated_shard_is_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    proc = _writer(uri, "t", 3)
    proc.communicate(timeout=120)
    ds = Dataset(uri)
    path = ds.ledger.abspath(ds.entries[0].shard)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-10])
    with pytest.raises(CorruptShardError, match="bytes"):
        list(Dataset(uri).iter_batches())
    mid = data.find(rows_for("t", 3, DIM)[1][1].tobytes()) + 5  # a byte inside row 1's weights
    assert mid > 5
    Path(path).write_bytes(data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1 :])
    with pytest.raises(CorruptShardError, match="checksum"):
        list(Dataset(uri).iter_batches())  # reads of weights verify the CRC32 by default
    with pytest.raises(CorruptShardError, match="checksum"):
        list(Dataset(uri).iter_batches(["id"], weights=False, verify=True))
    assert len(Dataset(uri).metadata(["id"])) == 3  # metadata-only reads check the size only
    assert sorted(Dataset(uri).ids) == ["t-0", "t-1", "t-2"]


def test_batch_ids_are_validated(tmp_path: Path) -> None:
    with pytest.raises(UnsafeIdError):
        Ledger(str(tmp_path)).new_shard_path("../escape")


def test_commit_refuses_a_second_layout(tmp_path: Path) -> None:
    """A build with another config (e.g. rank 2) cannot slip a second layout into a dataset."""
    from weightzoo.storage.layout import Layout
    from weightzoo.storage.shards import LayoutMismatchError, write_shard
    from weightzoo.storage.writer import commit_batch

    ledger = Ledger(str(tmp_path / "ds"))
    rows, w = rows_for("a", 2, DIM)
    commit_batch(ledger, "a", Layout(("w",), ((DIM,),), "float16"), rows, w)
    wide = Layout(("w",), ((DIM + 1,),), "float16")
    rows_b, w_b = rows_for("b", 2, DIM + 1)
    second = write_shard(ledger.fs, ledger.new_shard_path("b"), wide, rows_b, w_b)
    with pytest.raises(LayoutMismatchError, match=f"batch b: shard layout {wide.fingerprint} differs"):
        ledger.commit("b", second)
    assert sorted(Ledger(ledger.uri).committed_ids()) == ["a-0", "a-1"]
