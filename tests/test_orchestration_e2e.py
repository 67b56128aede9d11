"""End to end on real processes: ``prefect server start`` on loopback, ``prefect worker start`` process
workers, the finetune-batch deployment created from this checkout, the real engine on the tiny model.

One test runs ``weightzoo build --executor deployment`` from a user's folder with relative ``--manifest``,
``--base`` and ``--dataset`` (the workers start in this checkout, so the CLI must send absolute paths),
``kill -9``s the worker (and its flow-run child) and the build while a batch trains, then restarts the worker
and runs the same command again: exactly N unique ids, no uncommitted shard read. The fan-out over several
batches and workers is tests/test_production.py's. Another stops a build whose runs wait for a worker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import LEASE_TTL_S, REPO, TINY_FINETUNE, deployment_runs, stop_tree, worker_env

pytestmark = pytest.mark.slow

POOL = "wz-e2e"
DEPLOYMENT = "finetune-batch/e2e"
WAIT_S = 900  # generous: 2 shared cores, each flow-run process imports torch and diffusers


@pytest.fixture(scope="module")
def api(prefect_server: str) -> Iterator[str]:
    """This process talks to the real server; the process work pool and the deployment exist."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from weightzoo.deployments.deploy import deploy_finetune_batch

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        env = worker_env(prefect_server, Path(os.environ["PREFECT_HOME"]))
        subprocess.run([str(Path(sys.executable).with_name("prefect")), "work-pool", "create", POOL, "--type", "process"],
                       env=env, check=True, capture_output=True, timeout=120)
        deploy_finetune_batch(POOL, name="e2e")
        yield prefect_server


def _batch_runs(batch_ids: set[str] | None = None) -> list:
    return deployment_runs(DEPLOYMENT, batch_ids)


def _raw_commit_ids(dataset: Path) -> list[str]:
    """Every id in every ledger commit file, duplicates included (what readers would have to resolve)."""
    return [i for f in sorted((dataset / "ledger" / "commits").glob("*.json")) for i in json.loads(f.read_text())["ids"]]


def _wait_for_training(dataset: Path, deadline: float) -> str:
    """Block until one batch is committed and another is training (its progress artifact moved); return that batch."""
    from prefect.client.orchestration import get_client

    from weightzoo.storage.ledger import Ledger

    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if len(Ledger(str(dataset)).commits()) >= 1:
                committed = {c.batch for c in Ledger(str(dataset)).commits()}
                for a in client.read_latest_artifacts(limit=200):
                    batch = (a.key or "").removeprefix("progress-")
                    if a.key.startswith("progress-b-") and batch not in committed and 0 < float(a.data or 0) < 100:
                        return batch
            time.sleep(1)
    raise TimeoutError("no batch started training in time")


def test_a_build_from_a_users_folder_killed_mid_batch_then_resumed_commits_each_id_exactly_once(
    api: str, process_worker, tmp_path: Path, tiny_base: Path
) -> None:
    """``weightzoo build --executor deployment`` from a user's folder with relative ``--manifest``, ``--base``
    and ``--dataset`` (the workers start in this checkout: the CLI must send absolute paths). Its worker (and
    the flow-run child) and the build are ``kill -9``ed while the second batch trains, an orphan shard is left
    beside them; the same command, run again, rebuilds only the killed batch: exactly N unique ids, nothing
    uncommitted read, each batch run completed and linked to its parent in the UI."""
    from weightzoo.deployments.deploy import crash_orphaned_runs
    from weightzoo.storage.dataset import Dataset
    from weightzoo.storage.ledger import Ledger
    from weightzoo.storage.shards import RowMeta, write_shard
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    n, user = 4, tmp_path / "user"  # batches of 2: the first commits, the second is killed mid-training
    write_demo_manifest(str(user / "m"), n)
    shutil.copytree(tiny_base, user / "base")
    dataset = user / "ds"
    slow = TINY_FINETUNE | {"steps": 8}  # long enough to be killed mid-training
    build = [str(Path(sys.executable).with_name("weightzoo")), "build", "--manifest", "m/manifest.jsonl", "--base",
             "base", "--dataset", "ds", "--batch-size", "2", "--executor", "deployment", "--deployment", DEPLOYMENT,
             "--finetune-json", json.dumps(slow), "--lease-ttl-s", str(LEASE_TTL_S)]
    worker = process_worker(POOL, limit=1)  # one batch at a time: the first commits, the second is killed
    parent = subprocess.Popen(build, env=worker_env(api, tmp_path / "parent-home"), cwd=user,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        killed_batch = _wait_for_training(dataset, time.monotonic() + WAIT_S)
    finally:
        stop_tree(worker, signal.SIGKILL)
        stop_tree(parent, signal.SIGKILL)

    before = Ledger(str(dataset)).committed_ids()
    assert 0 < len(before) < n
    # Also an orphan a killed writer could leave: a complete shard of pending ids, never committed.
    ledger = Ledger(str(dataset))
    pending = ledger.pending([f"subject-{k:05d}" for k in range(n)])
    layout = Dataset(str(dataset)).layout
    write_shard(ledger.fs, ledger.new_shard_path("b-orphan"), layout, [RowMeta(id=pending[0])],
                torch.zeros(1, layout.numel, dtype=layout.torch_dtype))
    assert sorted(Dataset(str(dataset)).ids) == sorted(before)  # the orphan is invisible

    # The killed worker's run is left Running, holding a slot of the pool; what a restarted `weightzoo serve`
    # does first (the heartbeat automation is a test of its own, tests/test_production.py) marks it Crashed.
    assert crash_orphaned_runs(POOL) >= 1
    assert all(r.state.is_final() for r in _batch_runs())

    process_worker(POOL, limit=2)
    proc = subprocess.run([*build, "--json"], env=worker_env(api, tmp_path / "cli-home"), cwd=user,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)["summary"]
    assert (summary["committed"], summary["failed"], summary["pending"]) == (n, 0, 0)
    assert list(summary["batches"]) == [killed_batch]  # only the killed batch (same ids, same id) was planned
    assert set(summary["batches"].values()) == {"COMPLETED"}
    runs = [r for r in _batch_runs({killed_batch}) if r.state.is_completed()]
    assert len(runs) == 1 and runs[0].parent_task_run_id is not None  # linked to the parent in the UI
    assert summary["dataset"] == str(dataset)  # resolved against the user's folder, not the workers'
    assert not (REPO / "ds").exists() and not (REPO / "m").exists()
    ds = Dataset(str(dataset))
    assert len(ds) == n and sorted(ds.ids) == sorted(f"subject-{k:05d}" for k in range(n))
    rows = [t.column("id").to_pylist() for t, _ in ds.iter_batches(["id"], weights=False, verify=True)]
    assert sorted(i for ids in rows for i in ids) == sorted(ds.ids)  # what is read = exactly N unique rows
    raw = _raw_commit_ids(dataset)
    assert len(raw) == len(set(raw)) == n  # no id was ever committed twice
    assert len(list((dataset / "shards").glob("*.parquet"))) > len(ds.entries)  # the orphan is still on disk


def test_a_stopped_build_cancels_the_batch_runs_no_worker_started(api: str, tmp_path: Path, tiny_base: Path) -> None:
    """SIGTERM to ``weightzoo build`` while its runs wait for a worker (none is started): it exits 143 and
    leaves nothing queued to start later on a worker the user thought idle; nothing is committed."""
    from weightzoo.storage.ledger import Ledger
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    manifest, dataset = write_demo_manifest(str(tmp_path / "m"), 4), tmp_path / "ds"
    before = {r.id for r in _batch_runs()}
    log = tmp_path / "build.log"
    build = subprocess.Popen(
        [str(Path(sys.executable).with_name("weightzoo")), "build", "--manifest", manifest, "--base", str(tiny_base),
         "--dataset", str(dataset), "--batch-size", "2", "--executor", "deployment", "--deployment", DEPLOYMENT,
         "--finetune-json", json.dumps(TINY_FINETUNE)],
        env=worker_env(api, tmp_path / "home"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        start_new_session=True,
    )
    deadline = time.monotonic() + WAIT_S
    while len(queued := [r for r in _batch_runs() if r.id not in before]) < 2 and time.monotonic() < deadline:
        assert build.poll() is None, log.read_text()[-2000:]
        time.sleep(1)
    assert len(queued) == 2 and all(r.state.is_scheduled() for r in queued)
    build.send_signal(signal.SIGTERM)
    assert build.wait(120) == 143, log.read_text()[-2000:]
    mine = [r for r in _batch_runs() if r.id not in before]
    assert len(mine) == 2 and all(r.state.is_cancelled() for r in mine), [r.state for r in mine]
    assert len(Ledger(str(dataset)).committed_ids()) == 0 and not list(dataset.glob("shards/*.parquet"))
