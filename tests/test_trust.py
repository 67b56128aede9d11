"""A dataset you can trust: recipe refused before training, NaN rows refused, retries by cause, leases,
engines by name only. Real faults: a TCP proxy cut mid-upload in front of moto, a full tmpfs, a
read-only mount, a missing bucket, two builds at once. Every test ends by counting visible rows and ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from helpers import TINY_FINETUNE, TcpProxy, can_mount, tmpfs, worker_env

from weightzoo.cli import main as cli
from weightzoo.errors import RecipeMismatchError
from weightzoo.flows.config import BatchConfig, BuildConfig
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.lease import Lease
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.retry import is_permanent, is_transient, with_retries
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.batch import batch_id_for, run_batch
from weightzoo.tasks.identity.base_model import save_tiny_pipeline
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.synthetic import write_demo_manifest

CONFIG = FinetuneConfig(**TINY_FINETUNE)


class Counting:
    """A registered engine that prepares with the real one and counts the rows it gets (optionally poisoning one)."""

    def __init__(self, name: str = "counting", poison: str | None = None, after=None) -> None:
        self.name, self.poison, self.after, self.rows = name, poison, after, []
        real = engines.get(engines.DEFAULT_ENGINE)
        self.real = real
        engines.register(engines.Engine(name, real.load_base, real.fingerprint, self.prepare, real.config))

    def prepare(self, base, items, config, **kw):
        self.rows += [i.id for i in items]
        prepared = self.real.prepare(base, items, config, **kw)
        return dataclasses.replace(prepared, open_pack=functools.partial(self._open_pack, prepared.open_pack))

    @contextlib.contextmanager
    def _open_pack(self, open_pack, rows):
        """The real pack, whose flattened weights of the poisoned row get a NaN; ``after`` once it has trained."""
        with open_pack(rows) as pack:
            ids, flatten = [r.id for r in rows], pack.flatten
            if self.poison in ids:
                def poisoned(slot):
                    w = flatten(slot)
                    if slot == ids.index(self.poison):
                        w = w.clone()
                        w[3] = float("nan")
                    return w
                pack.flatten = poisoned
            yield pack
        if self.after is not None:
            self.after()


def _manifest(tmp_path: Path, n: int) -> tuple[str, list[str]]:
    manifest = write_demo_manifest(str(tmp_path / "m"), n, images_per_subject=1, size=32)
    ids = [json.loads(line)["id"] for line in Path(manifest).read_text().splitlines()]
    return manifest, ids


def _batch(manifest: str, base: Path, dataset: str, ids: list[str], engine: str, config=CONFIG):
    return run_batch(batch_id_for(ids), ids, manifest, str(base), dataset, config, engine=engine)


def _visible(dataset: str) -> tuple[int, int]:
    ids = Dataset(dataset).ids
    return len(ids), len(set(ids))


# -- classification ------------------------------------------------------------------------------------


def test_errors_are_classed_by_cause() -> None:
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    transient = [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        OSError("An error occurred (SlowDown) when calling the PutObject operation"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
    ]
    wrapped = OSError("upload failed")
    wrapped.__cause__ = EndpointConnectionError(endpoint_url="http://x")
    permanent = [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EROFS, "Read-only file system"),
        PermissionError(errno.EACCES, "Access Denied"),
        FileNotFoundError("The specified bucket does not exist"),
        RecipeMismatchError("another recipe"),
        ValueError("bad config"),
    ]
    assert all(is_transient(e) for e in [*transient, wrapped])
    assert not any(is_transient(e) for e in permanent)
    assert all(is_permanent(e) for e in permanent)
    assert not is_transient(RuntimeError("CUDA out of memory"))  # the engine splits packs for that


def test_with_retries_retries_transient_errors_and_raises_permanent_ones_at_once() -> None:
    calls, slept = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "ok"

    assert with_retries(flaky, "flaky", sleep=slept.append) == "ok"
    assert len(calls) == 3 and slept == [1.0, 2.0]

    def full() -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    calls.clear()
    with pytest.raises(OSError, match="No space"):
        with_retries(full, "full", sleep=slept.append)
    assert len(calls) == 1


# -- engines by name -----------------------------------------------------------------------------------


def test_engine_outside_the_registry_is_refused_by_both_request_models() -> None:
    common = {"manifest": "/m.jsonl", "base": "/b", "dataset": "/d"}
    for bad in ("os:system", "weightzoo.tasks.finetune.batch:null_finetune", "null", "builtins:eval",
                "weightzoo.tasks.finetune:finetune_batch"):  # an import path is never an engine name
        with pytest.raises(ValueError, match="unknown engine"):
            BuildConfig(**common, engine=bad)
        with pytest.raises(ValueError, match="unknown engine"):
            BatchConfig(**common, batch_id="b-1", ids=["a"], engine=bad)
    assert "os" not in engines.names() and engines.DEFAULT_ENGINE in engines.names()
    assert len(engines.names()) == len(set(engines.names()))


# -- one dataset, one recipe ---------------------------------------------------------------------------


def test_second_config_and_second_base_are_refused_before_any_training(tmp_path: Path, tiny_base: Path) -> None:
    manifest, ids = _manifest(tmp_path, 6)
    dataset = str(tmp_path / "ds")
    engine = Counting("counting-recipe")
    _batch(manifest, tiny_base, dataset, ids[:3], engine.name)
    assert engine.rows == ids[:3]
    card = (tmp_path / "ds" / "dataset_card.json").read_text()
    assert '"layout"' in card and '"rank": 1' in card

    with pytest.raises(RecipeMismatchError, match=r"config\.rank: 1 ≠ 2.*nothing was trained.*new dataset URI"):
        _batch(manifest, tiny_base, dataset, ids[3:], engine.name, CONFIG.model_copy(update={"rank": 2}))
    other_base = save_tiny_pipeline(tmp_path / "other-base", seed=1)
    with pytest.raises(RecipeMismatchError, match="base_model: "):
        _batch(manifest, other_base, dataset, ids[3:], engine.name)
    assert engine.rows == ids[:3]  # neither refused build trained a row

    # Execution-only fields are not part of the recipe: another pack size builds into the same dataset.
    _batch(manifest, tiny_base, dataset, ids[3:], engine.name, CONFIG.model_copy(update={"pack": 1}))
    assert _visible(dataset) == (6, 6)


def test_the_build_command_refuses_a_second_recipe_in_one_line(
    tmp_path: Path, tiny_base: Path, prefect_harness: None, capsys: pytest.CaptureFixture
) -> None:
    manifest, ids = _manifest(tmp_path, 3)
    dataset = str(tmp_path / "ds")
    args = ["build", "--manifest", manifest, "--base", str(tiny_base), "--dataset", dataset,
            "--finetune-json", '{"steps": 2, "num_class_images": 1, "class_inference_steps": 1}']
    assert cli(args) == 0
    capsys.readouterr()
    assert cli([*args[:-1], '{"steps": 3, "num_class_images": 1, "class_inference_steps": 1}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("weightzoo build: error:") and "config.steps: 2 ≠ 3" in err and "\n" not in err
    assert _visible(dataset) == (3, 3)


# -- NaN rows ------------------------------------------------------------------------------------------


def test_a_nan_row_is_refused_at_commit_and_recorded_as_its_failure(tmp_path: Path, tiny_base: Path) -> None:
    manifest, ids = _manifest(tmp_path, 4)
    dataset = str(tmp_path / "ds")
    engine = Counting("counting-nan", poison=ids[1])
    out = _batch(manifest, tiny_base, dataset, ids, engine.name)
    assert [i for i, _ in out.failed] == [ids[1]] and "not finite" in out.failed[0][1]
    assert Ledger(dataset).failed()[ids[1]].reason.startswith("weights not finite")
    for _, w in Dataset(dataset).iter_batches():
        assert torch.isfinite(torch.from_numpy(w.astype("float32"))).all()
    engine.poison = None
    _batch(manifest, tiny_base, dataset, ids, engine.name)  # the rerun trains only the failed row
    assert engine.rows == [*ids, ids[1]]
    assert _visible(dataset) == (4, 4)


# -- storage faults ------------------------------------------------------------------------------------


def test_s3_cut_mid_upload_retries_the_upload_not_the_training(
    tmp_path: Path, tiny_base: Path, s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = TcpProxy(host, int(port))
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        manifest, ids = _manifest(tmp_path, 3)
        dataset = f"{s3_bucket}/ds"
        # After training, the proxy drops the first connection that carries 2 KB upstream (the shard
        # upload) and refuses all connections for 6 s, longer than s3fs's own retries last.
        engine = Counting("counting-s3", after=lambda: proxy.cut_after(2048, down_s=6))
        out = _batch(manifest, tiny_base, dataset, ids, engine.name)
        assert proxy.cuts == 1
        assert engine.rows == ids  # trained once: the upload and the commit were retried, not the batch
        assert sorted(out.committed) == sorted(ids)
        assert _visible(dataset) == (3, 3)
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_missing_bucket_fails_fast_with_the_cause_in_status(
    tmp_path: Path, tiny_base: Path, s3_server: str, capsys: pytest.CaptureFixture
) -> None:
    manifest, ids = _manifest(tmp_path, 2)
    engine = Counting("counting-bucket")
    with pytest.raises(FileNotFoundError):
        _batch(manifest, tiny_base, "s3://no-such-bucket-wz/ds", ids, engine.name)
    assert engine.rows == []  # the first write (the lease) fails: nothing trained
    assert cli(["status", "--dataset", "s3://no-such-bucket-wz/ds"]) != 0
    assert "no such bucket: s3://no-such-bucket-wz" in capsys.readouterr().err


needs_mount = pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")


def _status_output(dataset: str, capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    assert cli(["status", "--dataset", dataset]) == 1  # status reports a problem: non-zero
    out = capsys.readouterr()
    return out.out + out.err


@needs_mount
@pytest.mark.parametrize("fault", ["full-disk", "read-only"])
def test_storage_that_refuses_writes_fails_fast_with_the_cause_in_status(
    fault: str, tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture
) -> None:
    """A full disk: the batch trains once, its shard does not fit, it fails at once (no retry), its rows are
    recorded as failed with the reason, no partial file is left. A read-only dataset: the lease write fails
    before any training and the committed rows are intact. ``status`` names the cause either way."""
    manifest, ids = _manifest(tmp_path, 4)
    with tmpfs(tmp_path / "mnt", "512k" if fault == "full-disk" else "16m") as mnt:
        dataset, engine = str(mnt / "ds"), Counting(f"counting-{fault}")
        if fault == "full-disk":
            config = CONFIG.model_copy(update={"rank": 16, "weights_dtype": "float32"})  # ~50 KB shard rows
            stat = os.statvfs(mnt)
            (mnt / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 48 * 1024))
            todo, errno_, cause, trained, visible = ids, errno.ENOSPC, "no space left", ids, (0, 0)
        else:
            config = CONFIG
            _batch(manifest, tiny_base, dataset, ids[:2], engine.name)
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            todo, errno_, cause, trained, visible = ids[2:], errno.EROFS, "read-only file system", ids[:2], (2, 2)
        with pytest.raises(OSError) as raised:
            _batch(manifest, tiny_base, dataset, todo, engine.name, config)
        assert raised.value.errno == errno_ and is_permanent(raised.value)
        assert engine.rows == trained  # never retried: a full disk trained once, a read-only one not at all
        if fault == "full-disk":
            failed = Ledger(dataset).failed()
            assert sorted(failed) == sorted(ids) and "No space left" in failed[ids[0]].reason
            assert not list((mnt / "ds" / "shards").rglob("*.parquet*"))  # no temp or partial shard left
        assert cause in _status_output(dataset, capsys)
        assert _visible(dataset) == visible


# -- leases --------------------------------------------------------------------------------------------


def test_a_live_lease_is_respected_and_an_expired_one_taken_over(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "ds"))
    a, b = Lease(ledger, "b-1", ttl_s=60), Lease(ledger, "b-1", ttl_s=60)
    assert a.acquire(settle_s=0)
    assert not b.acquire(settle_s=0) and b.held_by_other()
    short = Lease(ledger, "b-2", ttl_s=0.2)
    assert short.acquire(settle_s=0)
    time.sleep(0.3)
    assert Lease(ledger, "b-2", ttl_s=60).acquire(settle_s=0)  # the first holder is gone: taken over
    a.release()
    assert not Lease(ledger, "b-1", 60).held_by_other()
    # A build re-running its own crashed batch takes over at once; another build still waits.
    first = Lease(ledger, "b-3", ttl_s=60, owner="build-1")
    assert first.acquire(settle_s=0)
    assert Lease(ledger, "b-3", ttl_s=60, owner="build-1").acquire(settle_s=0)
    assert not Lease(ledger, "b-3", ttl_s=60, owner="build-2").acquire(settle_s=0)


def test_two_concurrent_builds_train_each_batch_about_once(tmp_path: Path, tiny_base: Path, prefect_server: str) -> None:
    """Two ``weightzoo build`` processes on one dataset, against one real Prefect server."""
    n, batch = 8, 2
    manifest, ids = _manifest(tmp_path, n)
    dataset = tmp_path / "ds"
    ft = {**TINY_FINETUNE, "steps": 10, "pack": 2}  # each batch trains long enough for the builds to overlap
    procs = []
    for k in range(2):
        env = worker_env(prefect_server, tmp_path / f"home{k}")
        cmd = [sys.executable, "-m", "weightzoo.cli", "build", "--manifest", manifest, "--base", str(tiny_base),
               "--dataset", str(dataset), "--batch-size", str(batch), "--finetune-json", json.dumps(ft)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = sum(pq.ParquetFile(f).metadata.num_rows for f in (dataset / "shards").glob("*.parquet"))
    assert trained <= n + batch, outputs  # every shard file, committed or not, holds rows that were trained
    assert _visible(str(dataset)) == (n, n)


# -- corruption, end to end ----------------------------------------------------------------------------


def _flip_a_weights_byte(path: Path) -> None:
    """Flip one byte of the first row's weights where they sit in the file (it stays valid Parquet)."""
    first = pq.read_table(path, columns=["weights"]).column("weights")[0].as_py()[:32]
    data = bytearray(path.read_bytes())
    data[data.index(first) + 7] ^= 0xFF
    path.write_bytes(bytes(data))


def _build_args(manifest: str, base: Path, dataset: str) -> list[str]:
    return ["build", "--manifest", manifest, "--base", str(base), "--dataset", dataset, "--batch-size", "2",
            "--finetune-json", json.dumps({**TINY_FINETUNE, "pack": 2})]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, prefect_harness: None) -> tuple[str, list[str], Path]:
    """One real build of 4 ids in 2 batches, (manifest, ids, dataset folder); each corruption test damages
    its own copy of the dataset, so the same clean build is not trained twice."""
    root = tmp_path_factory.mktemp("built")
    manifest, ids = _manifest(root, 4)
    assert cli(_build_args(manifest, tiny_base, str(root / "ds"))) == 0
    assert _visible(str(root / "ds")) == (4, 4)
    return manifest, ids, root / "ds"


@pytest.mark.parametrize("fault", ["flipped-byte", "deleted-shard"])
def test_corrupt_shard_is_caught_by_every_reader_then_repaired_and_rebuilt(
    fault: str, built: tuple[str, list[str], Path], tmp_path: Path, tiny_base: Path, capsys: pytest.CaptureFixture
) -> None:
    """A real build (a copy of the module's); one committed shard damaged; export, fit-subspace and verify each
    refuse it, naming the shard; verify --repair quarantines it; the next build retrains exactly its rows:
    N unique ids again."""
    manifest, ids, clean = built
    shutil.copytree(clean, tmp_path / "ds")
    dataset = str(tmp_path / "ds")
    build = _build_args(manifest, tiny_base, dataset)
    entry = Ledger(dataset).commits()[0]
    shard = tmp_path / "ds" / entry.shard
    if fault == "flipped-byte":
        _flip_a_weights_byte(shard)
    else:
        shard.unlink()
    capsys.readouterr()
    for command in (["export", "--dataset", dataset, "--id", entry.ids[0], "--out", str(tmp_path / "x.safetensors")],
                    ["fit-subspace", "--dataset", dataset, "--out", str(tmp_path / "sub"), "-k", "1", "--no-prefect"],
                    ["verify", "--dataset", dataset]):
        assert cli(command) != 0, command
        out = capsys.readouterr()
        assert entry.shard.rsplit("/", 1)[-1] in out.out + out.err, command
    assert cli(["verify", "--dataset", dataset, "--repair"]) == 1  # found (and quarantined) one
    assert sorted(Ledger(dataset).pending(ids)) == sorted(entry.ids)
    assert cli(build) == 0
    assert cli(["verify", "--dataset", dataset]) == 0
    assert _visible(dataset) == (4, 4)
