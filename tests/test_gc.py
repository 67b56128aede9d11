"""gc: only old, uncommitted shard files and stale temp files are removed; committed rows, ledger and
other files stay."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from shard_writer_proc import rows_for

from weightzoo.cli import main
from weightzoo.errors import NotFoundError
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.gc import _mtime, collect, find_orphans
from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import CommitEntry, Ledger
from weightzoo.storage.retry import LostWriteError, is_permanent, is_transient, with_retries
from weightzoo.storage.shards import TMP_DIR, ShardWriter, write_shard
from weightzoo.storage.writer import commit_batch

DIM = 16
LAYOUT = Layout(("w",), ((DIM,),), "float16")
HOUR = timedelta(hours=1)
LEGACY_TMP = "shards/b9-0123456789ab.parquet.tmp-0123456789ab"  # a sibling temp of the writer before _tmp/
STALE_TMP = "shards/_tmp/b8-0123456789ab.parquet.tmp-0123456789ab"  # a killed writer's temp


def _commit(ledger: Ledger, batch: str, n: int = 3) -> str:
    rows, w = rows_for(batch, n, DIM)
    entry = commit_batch(ledger, batch, LAYOUT, rows, w)
    assert entry is not None
    return ledger.abspath(entry.shard)


def _orphan(ledger: Ledger, batch: str) -> str:
    """A shard written like a batch attempt's, never committed (its writer 'crashed')."""
    rows, w = rows_for(batch, 2, DIM)
    return write_shard(ledger.fs, ledger.new_shard_path(batch), LAYOUT, rows, w).path


def _age(path: str, hours: float = 3) -> None:
    t = time.time() - hours * 3600
    os.utime(path, (t, t))


def _all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _rows(uri: str) -> dict[str, np.ndarray]:
    return {i: w[k] for t, w in Dataset(uri).iter_batches() for k, i in enumerate(t.column("id").to_pylist())}


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[str, str, str]:
    """A dataset with two committed shards, one old orphan, one fresh orphan, and old non-shard files.

    Returns (uri, old orphan's relative path, fresh orphan's relative path). Everything but the fresh
    orphan is backdated 3 h, so only the commit ledger keeps committed shards from being collected.
    """
    uri = str(tmp_path / "ds")
    ledger = Ledger(uri)
    committed = [_commit(ledger, "b0"), _commit(ledger, "b1")]
    # a race loser: a second attempt at b0 committed with no visible ids — its entry still points at it
    rows, w = rows_for("b0", 3, DIM)
    loser = write_shard(ledger.fs, ledger.new_shard_path("b0"), LAYOUT, rows, w)
    ledger.commits = lambda: []  # type: ignore[method-assign]  # both writers read the ledger before either wrote
    assert ledger.commit("b0", loser) is not None
    old, fresh = _orphan(ledger, "b2"), _orphan(ledger, "b3")
    (tmp_path / "ds" / "shards" / "notes.txt").write_text("not a shard")
    (tmp_path / "ds" / LEGACY_TMP).write_bytes(b"partial")
    (tmp_path / "ds" / STALE_TMP).write_bytes(b"partial shard")
    for p in (tmp_path / "ds").rglob("*"):
        if p.is_file() and str(p) != fresh:
            _age(str(p))
    assert {ledger._relative(p) for p in committed} <= _all_files(tmp_path / "ds")
    return uri, ledger._relative(old), ledger._relative(fresh)


def test_dry_run_lists_exactly_the_old_orphan(dataset: tuple[str, str, str]) -> None:
    uri, old, _ = dataset
    before = _all_files(Path(uri))
    orphans = find_orphans(uri, HOUR)
    assert [o.path for o in orphans] == [old]
    assert orphans[0].size == os.path.getsize(os.path.join(uri, old)) > 0
    assert datetime.now(UTC) - orphans[0].mtime > timedelta(hours=2)
    report = collect(uri, HOUR, delete=False)
    assert report.recent == 1 and not report.skipped and not report.deleted
    assert sorted(t.path for t in report.temps) == sorted([LEGACY_TMP, STALE_TMP])
    assert report.nbytes == orphans[0].size + len(b"partial") + len(b"partial shard")
    assert _all_files(Path(uri)) == before  # a dry run deletes nothing


def test_fresh_orphan_is_kept_by_the_grace_period(dataset: tuple[str, str, str]) -> None:
    uri, old, fresh = dataset
    assert fresh not in {o.path for o in find_orphans(uri, HOUR)}
    assert {o.path for o in find_orphans(uri, timedelta(0))} == {old, fresh}  # no grace: both
    assert find_orphans(uri, timedelta(hours=4)) == []  # grace longer than the old orphan's age


def test_delete_removes_only_the_orphan_and_stale_temps(dataset: tuple[str, str, str]) -> None:
    uri, old, _ = dataset
    before_rows = _rows(uri)
    before = _all_files(Path(uri))
    report = collect(uri, HOUR, delete=True)
    assert report.deleted and [o.path for o in report.orphans] == [old] and len(report.temps) == 2
    assert _all_files(Path(uri)) == before - {old, LEGACY_TMP, STALE_TMP}
    after_rows = _rows(uri)
    assert sorted(after_rows) == sorted(f"b{b}-{i}" for b in (0, 1) for i in range(3))
    assert all(np.array_equal(after_rows[i], before_rows[i]) for i in before_rows)
    assert find_orphans(uri, HOUR) == []  # a second pass finds nothing


def test_cli_dry_run_then_delete(dataset: tuple[str, str, str], capsys: pytest.CaptureFixture[str]) -> None:
    uri, old, fresh = dataset
    assert main(["gc", "--dataset", uri]) == 0
    out = capsys.readouterr().out
    assert "would remove 1 orphan shard and 2 stale temp files," in out and "dry run" in out
    assert old in out and STALE_TMP in out and fresh not in out
    assert os.path.exists(os.path.join(uri, old))

    assert main(["gc", "--dataset", uri, "--older-than", "30m", "--delete"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 orphan shard and 2 stale temp files," in out and old in out
    assert not os.path.exists(os.path.join(uri, STALE_TMP))
    assert not os.path.exists(os.path.join(uri, old)) and os.path.exists(os.path.join(uri, fresh))
    assert len(Dataset(uri)) == 6

    assert main(["gc", "--dataset", uri, "--older-than", "2d"]) == 0
    assert "would remove 0 orphan shards" in capsys.readouterr().out


def test_cli_rejects_bad_durations_and_missing_datasets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["gc", "--dataset", str(tmp_path), "--older-than", "1 hour"])
    assert main(["gc", "--dataset", str(tmp_path / "nope")]) == 2
    assert "no dataset at" in capsys.readouterr().err


def test_mtime_from_fsspec_info() -> None:
    t = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert _mtime({"mtime": t.timestamp()}) == t  # local
    assert _mtime({"LastModified": t}) == t  # s3fs
    assert _mtime({"size": 1}) is None


def test_gc_over_s3(s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    """S3 mtimes cannot be backdated, so the grace is exercised as 'default keeps it, 0s collects it'."""
    uri = s3_bucket + "/dataset"
    ledger = Ledger(uri)
    _commit(ledger, "s0")
    orphan = ledger._relative(_orphan(ledger, "s1"))
    report = collect(uri, HOUR, delete=False)
    assert report.orphans == [] and report.recent == 1  # LastModified read: it is fresh
    assert [o.path for o in find_orphans(uri, timedelta(0))] == [orphan]
    assert main(["gc", "--dataset", uri, "--older-than", "0s", "--delete"]) == 0
    out = capsys.readouterr().out
    assert orphan in out and "removed 1 orphan shard and 0 stale temp files," in out
    assert not ledger.fs.exists(ledger.abspath(orphan))
    assert sorted(Dataset(uri).ids) == [f"s0-{i}" for i in range(3)]
    assert "testing" not in out  # no credentials in what is printed


# -- gc racing a build ----------------------------------------------------------------------------------


def _null_engine() -> str:
    """bench/null_engine.py's engine: real batches (plan, lease, base load, shard, commit), no training."""
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("null_engine", REPO / "bench" / "null_engine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["null_engine"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module.register_null_engine()


def _gc_loop(dataset: str, stop: threading.Event, kept: list[int], errors: list[BaseException]) -> None:
    """``gc --older-than 0s --delete`` as fast as it can go, counting in-flight files it had to keep."""
    while not stop.is_set():
        try:
            kept.append(collect(dataset, timedelta(0), delete=True).leased)
        except NotFoundError:  # the build has not created the dataset yet
            continue
        except BaseException as e:  # noqa: BLE001 - reported by the test, not swallowed
            errors.append(e)
            return


def test_gc_with_zero_grace_racing_a_build_never_loses_a_row(
    tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Builds of several small batches with gc deleting at 0s grace in a loop beside them: every batch
    commits, status and verify exit 0, and exactly N ids are visible, once each. Repeated until gc has kept
    in-flight files of a leased batch (the window where it deleted a shard before its commit) several times."""
    from helpers import TINY_FINETUNE

    from weightzoo.tasks.finetune.batch import batch_id_for, run_batch
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    engine, n, per_batch = _null_engine(), 12, 4
    manifest = write_demo_manifest(str(tmp_path / "m"), n, images_per_subject=1, size=32)
    ids = [json.loads(line)["id"] for line in Path(manifest).read_text().splitlines()]
    in_flight_kept, rounds = 0, 0
    while in_flight_kept < 3 and rounds < 12:
        dataset, stop, kept, errors = str(tmp_path / f"ds{rounds}"), threading.Event(), [], []
        gc = threading.Thread(target=_gc_loop, args=(dataset, stop, kept, errors))
        gc.start()
        try:
            outcomes = [run_batch(batch_id_for(part), part, manifest, str(tiny_base), dataset,
                                  FinetuneConfig(**TINY_FINETUNE), engine=engine)
                        for part in (ids[k : k + per_batch] for k in range(0, n, per_batch))]
        finally:
            stop.set()
            gc.join()
        assert errors == []
        assert sorted(i for o in outcomes for i in o.committed) == sorted(ids)
        capsys.readouterr()
        assert main(["status", "--dataset", dataset]) == 0, capsys.readouterr().out
        assert main(["verify", "--dataset", dataset]) == 0, capsys.readouterr().out
        seen = Dataset(dataset).ids
        assert (len(seen), len(set(seen))) == (n, n)
        in_flight_kept += sum(kept)
        rounds += 1
    assert in_flight_kept >= 3, f"gc never met a batch in flight in {rounds} rounds"


def test_a_temp_file_removed_mid_write_is_retried(tmp_path: Path) -> None:
    """A writer whose temp file vanished (a racing gc) fails with a retried cause, and the retry commits."""
    ledger = Ledger(str(tmp_path / "ds"))
    rows, w = rows_for("b1", 3, DIM)
    attempts: list[str] = []

    def attempt() -> CommitEntry | None:
        attempts.append("x")
        if len(attempts) == 1:  # the first attempt loses its temp file before the rename
            writer = ShardWriter(ledger.fs, ledger.new_shard_path("b1"), LAYOUT)
            writer.write(rows, w)
            for temp in Path(ledger.abspath(f"shards/{TMP_DIR}")).iterdir():
                temp.unlink()
            writer.close()
        return commit_batch(ledger, "b1", LAYOUT, rows, w)

    with pytest.raises(LostWriteError) as lost:
        attempt()
    assert is_transient(lost.value) and not is_permanent(lost.value)
    assert is_transient(FileNotFoundError(2, "No such file", f"{ledger.root}/shards/_tmp/b-0.parquet.tmp-0123456789ab"))
    assert is_permanent(FileNotFoundError(2, "No such file", "/data/images/face.png"))  # input stays permanent
    attempts.clear()
    entry = with_retries(attempt, "committing b1", sleep=lambda s: None)
    assert entry is not None and len(attempts) == 2
    assert main(["status", "--dataset", ledger.uri]) == 0
    seen = Dataset(ledger.uri).ids
    assert (len(seen), len(set(seen))) == (3, 3)
