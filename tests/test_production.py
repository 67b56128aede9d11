"""Production Prefect: PostgreSQL + Redis, API and services apart, heartbeats and the crashed-run automation,
chained-flow triggers, PCA on Dask, the Kubernetes GPU job template.

The end-to-end tests (``slow``) start a real PostgreSQL and Redis on free loopback ports in a temp folder
(Debian's packages; skipped only when those binaries are absent), then ``weightzoo.deployments.servers``'s Prefect API
(``--no-services``) and services processes over them, once for the module, and real process workers.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from helpers import (
    REPO,
    TINY_FINETUNE,
    WORKER_QUERY_S,
    deployment_build,
    deployment_runs,
    process_workers,
    run_batch_id,
    stop_tree,
)

from weightzoo.deployments import servers as srv
from weightzoo.deployments.net import free_port

POOL = "wz-prod"
DEPLOYMENT = "finetune-batch/prod"
WAIT_S = 1200  # generous: 2 shared cores, each flow-run process imports torch and diffusers


# ---------------------------------------------------------------- contracts (no server)


def test_prefect_yaml_chains_downstream_flows_on_a_completed_build() -> None:
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    build_dataset = deployments["build-dataset"]["parameters"]["config"]["dataset"]
    for name in ("fit-subspace", "train-weight-diffusion"):
        triggers = deployments[name]["triggers"]
        assert len(triggers) == 1
        t = DeploymentEventTrigger.model_validate(triggers[0])  # Prefect's own schema for prefect.yaml triggers
        assert t.enabled is False  # off by default, like the nightly schedule
        assert t.expect == {"prefect.flow-run.Completed"}
        assert t.match_related.root == {"prefect.resource.role": "flow", "prefect.resource.name": "build-dataset"}
        assert deployments[name]["parameters"]["config"]["dataset"] == build_dataset  # the chain reads what was built


def test_crash_automation_file_is_a_proactive_heartbeat_trigger() -> None:
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import Posture

    a = srv.load_automation()
    assert a.trigger.posture == Posture.Proactive
    assert a.trigger.after == {"prefect.flow-run.heartbeat"} and "prefect.flow-run.heartbeat" in a.trigger.expect
    assert a.trigger.for_each == {"prefect.resource.id"}
    assert a.trigger.within.total_seconds() >= 2 * srv.HEARTBEAT_S  # one late heartbeat is not a crash
    assert [type(x) for x in a.actions] == [ChangeFlowRunState] and a.actions[0].state.value == "CRASHED"
    gpu = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["definitions"]["work_pools"]["gpu"]
    assert gpu["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(srv.HEARTBEAT_S)


def test_kubernetes_gpu_template_matches_prefect_kubernetes_default() -> None:
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    ours = json.loads((REPO / "deployments" / "k8s-gpu-base-job-template.json").read_text())
    assert set(ours["variables"]["properties"]) == set(default["variables"]["properties"])
    assert set(ours["job_configuration"]) == set(default["job_configuration"])
    (container,) = ours["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == "{{ command }}" and container["image"] == "{{ image }}"  # the worker's plumbing kept


def test_postgres_env_sets_prefects_production_settings_without_printing_secrets(capsys) -> None:
    from weightzoo.cli import main as cli

    cfg = srv.ServerConfig(backend="postgres", port=4310, database_url="postgresql://wz:s3cret@db:5432/prefect",
                           redis_url="redis://:r3dis@cache:6380/2")
    env = srv.postgres_env(cfg)
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == "postgresql+asyncpg://wz:s3cret@db:5432/prefect"
    assert env["PREFECT_MESSAGING_BROKER"] == env["PREFECT_MESSAGING_CACHE"] == "prefect_redis.messaging"
    assert env["PREFECT_SERVER_EVENTS_CAUSAL_ORDERING"] == "prefect_redis.ordering"
    assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == "prefect_redis.lease_storage"
    assert (env["PREFECT_REDIS_MESSAGING_HOST"], env["PREFECT_REDIS_MESSAGING_PORT"], env["PREFECT_REDIS_MESSAGING_DB"]) \
        == ("cache", "6380", "2")
    assert env["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] == "false"
    assert int(env["PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"]) > 5
    assert "s3cret" not in repr(cfg)  # SecretStr: a logged config shows no password
    assert [c[2:5] for c in srv.server_commands(cfg)] == [["start", "--host", "127.0.0.1"], ["services", "start"]]
    assert "--no-services" in srv.server_commands(cfg)[0]
    assert cli(["serve", "--print", "--gpus", "1", "--backend", "postgres"]) == 0
    out = capsys.readouterr().out
    assert "prefect server database upgrade -y" in out and "prefect server services start" in out
    assert "s3cret" not in out and "r3dis" not in out


# ---------------------------------------------------------------- PCA on Dask (Prefect test harness)


def _write_rows(uri: str, x: np.ndarray, shard_rows: int) -> None:
    """A real dataset (shards + ledger commits) holding the rows of ``x``."""
    from weightzoo.storage.layout import Layout
    from weightzoo.storage.ledger import Ledger
    from weightzoo.storage.shards import RowMeta
    from weightzoo.storage.writer import commit_batch

    layout = Layout(("w",), ((x.shape[1],),), "float32")
    ledger = Ledger(uri)
    for start in range(0, len(x), shard_rows):
        rows = [RowMeta(f"r{i:04d}") for i in range(start, min(start + shard_rows, len(x)))]
        commit_batch(ledger, f"b{start:04d}", layout, rows, layout.to_numpy(torch.from_numpy(x[start:start + shard_rows])))


def test_fit_subspace_on_a_local_dask_cluster_matches_threads(prefect_harness, tmp_path: Path) -> None:
    from weightzoo.flows.config import FitSubspaceConfig
    from weightzoo.flows.fit_subspace import flow_for, task_runner_for
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.subspace.config import SubspaceConfig
    from weightzoo.tasks.subspace.pca import load_subspace

    g = np.random.default_rng(0)
    x = (g.standard_normal((96, 6)) @ g.standard_normal((6, 300)) + 0.01 * g.standard_normal((96, 300))).astype(np.float32)
    _write_rows(str(tmp_path / "ds"), x, shard_rows=12)
    options = SubspaceConfig(components=4, power_iters=2, device="cpu", tasks_per_pass=4)
    runs = {}
    for runner in ("threads", "dask"):
        params = FitSubspaceConfig(dataset=str(tmp_path / "ds"), out=str(tmp_path / runner), options=options,
                                   task_runner=runner, dask_workers=2)
        assert type(task_runner_for(params)).__name__ == {"threads": "ThreadPoolTaskRunner", "dask": "DaskTaskRunner"}[runner]
        runs[runner] = flow_for(params)(params)
        assert runs[runner].rows == 96
    a, b = load_subspace(str(tmp_path / "threads")), load_subspace(str(tmp_path / "dask"))
    torch.testing.assert_close(b.components, a.components, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.singular_values, a.singular_values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.mean, a.mean)
    ds = Dataset(str(tmp_path / "ds"))
    assert len(ds) == 96 and len(set(ds.ids)) == 96


def test_dask_task_runner_uses_a_given_cluster_address() -> None:
    from weightzoo.flows.config import FitSubspaceConfig
    from weightzoo.flows.fit_subspace import task_runner_for

    params = FitSubspaceConfig(dataset="d", out="o", task_runner="dask", dask_address="tcp://10.0.0.5:8786")
    runner = task_runner_for(params)
    assert runner.address == "tcp://10.0.0.5:8786"


# ---------------------------------------------------------------- PostgreSQL + Redis end to end


@pytest.fixture(scope="module")
def pg_redis() -> Iterator[tuple[str, str]]:
    """A real PostgreSQL and Redis on free loopback ports in a fresh temp folder (the postgres user must reach
    it, so it is a 0711 folder under /tmp rather than pytest's 0700 tmp tree); stopped and removed after."""
    if not srv.have_local_services():
        pytest.skip("PostgreSQL server binaries or redis-server are not installed (apt-get install postgresql redis-server)")
    root = Path(tempfile.mkdtemp(prefix="wz-prod-"))
    root.chmod(0o711)
    try:
        with srv.local_services(root / "services") as urls:
            yield urls
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def prod_api(pg_redis: tuple[str, str], prefect_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """weightzoo.deployments.servers's postgres backend (migration step, API --no-services, services process), the crashed-run
    automation installed, a process pool and the finetune-batch deployment; this process talks to it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from weightzoo.deployments.deploy import deploy_finetune_batch

    home = tmp_path_factory.mktemp("prod-home")
    cfg = srv.ServerConfig(backend="postgres", port=free_port(), database_url=pg_redis[0], redis_url=pg_redis[1],
                           home=home / "server")
    with srv.running_server(cfg, home / "logs") as server, temporary_settings(updates={PREFECT_API_URL: cfg.api_url}):
        srv.install_automation()
        subprocess.run([srv.PREFECT, "work-pool", "create", POOL, "--type", "process"], env=_env(cfg.api_url, home),
                       check=True, capture_output=True, timeout=120)
        deploy_finetune_batch(POOL, name="prod")
        yield cfg.api_url
        srv.drain_queues()  # this process's events reach the server before it stops
        assert server.alive(), "a server process died during the module"


def _env(api: str, home: Path) -> dict[str, str]:
    return srv.worker_env(api, PREFECT_HOME=str(home / "client"), PREFECT_LOGGING_LEVEL="WARNING", HF_HUB_OFFLINE="1",
                          PREFECT_WORKER_QUERY_SECONDS=WORKER_QUERY_S)


@pytest.fixture
def prod_workers(prod_api: str, tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen]]:
    """Start real ``prefect worker start`` process workers (limit 1 each) on the postgres-backed API."""
    with process_workers(POOL, _env(prod_api, tmp_path), tmp_path) as start:
        yield start


def _request(manifest: str, base: Path, dataset: Path, finetune: dict):
    return deployment_build(manifest, base, dataset, finetune, DEPLOYMENT, WAIT_S)


def _runs(batch_ids: set[str] | None = None) -> list:
    """Runs of the deployment (of some batches only); tests share batch ids, so callers exclude earlier runs."""
    return deployment_runs(DEPLOYMENT, batch_ids)


def _assert_exactly(dataset: Path, n: int) -> None:
    from weightzoo.storage.dataset import Dataset
    from weightzoo.storage.ledger import Ledger

    ds = Dataset(str(dataset))
    assert len(ds) == n and len(set(ds.ids)) == n
    assert len(Ledger(str(dataset)).committed_ids()) == n
    raw = [i for f in sorted((dataset / "ledger" / "commits").glob("*.json")) for i in json.loads(f.read_text())["ids"]]
    assert len(raw) == len(set(raw)) == n  # no id was ever committed twice


def _training_run(worker: subprocess.Popen) -> str | None:
    """The flow-run id a worker's child process is running (from its PREFECT__FLOW_RUN_ID), if any."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(worker.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                run_id = child.environ().get("PREFECT__FLOW_RUN_ID")
                if run_id:
                    return run_id
    return None


def _kill_one_mid_batch(workers: list[subprocess.Popen], deadline: float, killed: dict) -> None:
    """Wait until some worker's batch run is training (its progress artifact moved), then ``kill -9`` that
    worker and its flow-run process; record the run and batch in ``killed``."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for w in workers:
                run_id = _training_run(w)
                if run_id is None:
                    continue
                batch = run_batch_id(client.read_flow_run(run_id))
                progress = [a for a in client.read_latest_artifacts(limit=200) if a.key == f"progress-{batch}"]
                if progress and 0 < float(progress[0].data or 0) < 100:
                    stop_tree(w, signal.SIGKILL)
                    killed.update(run_id=run_id, batch=batch)
                    return
            time.sleep(0.5)


@pytest.mark.slow
def test_fan_out_on_two_workers_whose_killed_run_is_crashed_by_the_automation_and_rebuilt_in_the_same_build(
    prod_api: str, prod_workers, tmp_path: Path, tiny_base: Path
) -> None:
    """One build of 3 batches on 2 postgres-backed workers checks the fan-out (every batch Completed, one
    run each for the batches nobody killed, every run tagged for the automation) and the kill: the killed
    worker's run turns Crashed through the heartbeat automation and its batch is rebuilt in round 2."""
    from prefect.client.orchestration import get_client

    from weightzoo.flows.build_dataset import build_dataset
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    n = 6  # 3 batches of 2 on 2 workers: one worker is killed mid-batch, the other finishes everything
    manifest = write_demo_manifest(str(tmp_path / "m"), n)
    slow = TINY_FINETUNE | {"steps": 20}  # long enough to be killed mid-training
    workers = [prod_workers(), prod_workers()]
    killed: dict = {}
    ctx = contextvars.copy_context()  # the killer thread talks to the same API as this test
    killer = threading.Thread(target=ctx.run, args=(_kill_one_mid_batch, workers, time.monotonic() + WAIT_S, killed),
                              daemon=True)
    earlier = {r.id for r in _runs()}
    killer.start()
    summary = build_dataset(_request(manifest, tiny_base, tmp_path / "ds", slow))  # no rerun, no manual state change
    killer.join()
    assert killed, "no batch was caught training"
    assert (summary["committed"], summary["failed"], summary["pending"]) == (n, 0, 0)
    assert summary["batches"][killed["batch"]] == "COMPLETED"  # re-planned under the same batch id, in round 2
    assert len(summary["batches"]) == 3 and set(summary["batches"].values()) == {"COMPLETED"}
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(killed["run_id"]).state
    assert state.is_crashed() and "weightzoo-crash-zombie-runs" in (state.message or "")  # the automation did it
    runs = [r for r in _runs({killed["batch"]}) if r.id not in earlier]
    assert len(runs) == 2 and sorted(r.state.type.value for r in runs) == ["COMPLETED", "CRASHED"]
    others = [r for r in _runs(set(summary["batches"]) - {killed["batch"]}) if r.id not in earlier]
    assert len(others) == 2 and all(r.state.is_completed() for r in others)  # the fan-out: one run per batch
    assert all("weightzoo" in r.tags for r in runs + others)  # what the crashed-run automation watches
    _assert_exactly(tmp_path / "ds", n)
