"""What ``weightzoo serve`` sets up on one GPU box, and what tests and benches deploy: the gpu work pool,
the finetune-batch deployment from this checkout, the crashed-run automation, one worker per GPU (after
crashing the runs a stopped serve left running, which would hold the pool's slots).

The server processes themselves (SQLite, or PostgreSQL + Redis with the API and services apart) are
:mod:`weightzoo.deployments.servers`; the command only parses its flags and calls :func:`serve`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from pydantic import SecretStr

from weightzoo.deployments import servers as srv
from weightzoo.storage.fs import redact

ENTRYPOINT = "flows/finetune_batch.py:finetune_batch"


def gpu_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def _backend_lines(backend: str) -> list[str]:
    """The environment and setup steps the postgres backend adds; secrets shown as placeholders only."""
    if backend == "sqlite":
        return []
    cfg = srv.ServerConfig(backend="postgres", database_url="postgresql://USER:PASSWORD@DBHOST:5432/prefect",
                           redis_url="redis://:PASSWORD@REDISHOST:6379/0")
    env = srv.postgres_env(cfg)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = "postgresql+asyncpg://USER:PASSWORD@DBHOST:5432/prefect"
    return [f"export {k}={v}" for k, v in env.items()] + ["prefect server database upgrade -y"]


def commands(port: int, pool: str, gpus: int, backend: str = "sqlite", heartbeat_s: int = srv.HEARTBEAT_S) -> list[str]:
    """The shell commands ``serve`` runs, in order (each long-running one in its own terminal)."""
    api = f"http://127.0.0.1:{port}/api"
    start = f"prefect server start --host 127.0.0.1 --port {port}"
    server = [start] if backend == "sqlite" else [f"{start} --no-services", "prefect server services start"]
    lines = [
        *_backend_lines(backend),
        *server,
        f"export PREFECT_API_URL={api}",
        f"export PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat_s}",
        f"prefect work-pool create {pool} --type process --overwrite",
        f"prefect work-pool set-concurrency-limit {pool} {gpus}",
        f"cd {srv.REPO} && prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml",
        f"prefect automation create --from-file {srv.CRASH_AUTOMATION.relative_to(srv.REPO)}",
    ]
    lines += [f"CUDA_VISIBLE_DEVICES={i} prefect worker start --pool {pool} --limit 1 --name {pool}-{i}" for i in range(gpus)]
    return lines


def deploy_finetune_batch(pool: str, name: str = "gpu", concurrency_limit: int | None = None,
                          entrypoint: str = ENTRYPOINT) -> str:
    """Create (or update) the finetune-batch deployment from this checkout on ``pool``; returns its id.

    The source is this folder (no git pull, no image): workers on this box run the code as it is here.
    ``entrypoint`` lets the benches deploy a wrapper of the same flow (``bench/null_worker.py``). Its runs
    are tagged ``weightzoo`` and send heartbeats every 30 s whatever the worker's settings, which is what
    the crashed-run automation (deployments/crash-zombie-runs.yaml) watches.
    """
    from prefect import flow

    deployable = flow.from_source(source=str(srv.REPO), entrypoint=entrypoint)
    return str(deployable.deploy(name=name, work_pool_name=pool, concurrency_limit=concurrency_limit,
                                 build=False, push=False, print_next_steps=False, tags=list(srv.DEPLOYMENT_TAGS),
                                 job_variables={"env": srv.heartbeat_env()}))


def default_data_dir() -> Path:
    """Root's home is private (0700) and PostgreSQL runs as the postgres user, so root keeps data in /var/lib."""
    return Path("/var/lib/weightzoo/serve") if os.geteuid() == 0 else Path.home() / ".weightzoo" / "serve"


def server_config(cfg: srv.ServerConfig, data_dir: str | None, stack: contextlib.ExitStack) -> srv.ServerConfig:
    """``cfg``, where the postgres backend has no URLs, with PostgreSQL / Redis started in the data folder
    (stopped when ``stack`` closes)."""
    if cfg.backend == "sqlite" or (cfg.database_url and cfg.redis_url):
        return cfg
    data = Path(data_dir) if data_dir else default_data_dir()
    data.mkdir(parents=True, exist_ok=True)
    if cfg.database_url is None:
        pg = srv.LocalPostgres(data)
        stack.callback(pg.stop)
        cfg = cfg.model_copy(update={"database_url": SecretStr(pg.start())})
        print(f"PostgreSQL: {redact(cfg.database_url.get_secret_value())} (data in {pg.data})")
    if cfg.redis_url is None:
        rd = srv.LocalRedis(data)
        stack.callback(rd.stop)
        cfg = cfg.model_copy(update={"redis_url": SecretStr(rd.start())})
        print(f"Redis: {redact(cfg.redis_url.get_secret_value())}")
    return cfg


def setup_pool(pool: str, gpus: int, env: dict[str, str]) -> None:
    prefect = srv.PREFECT
    subprocess.run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env, check=True)
    subprocess.run([prefect, "work-pool", "set-concurrency-limit", pool, str(gpus)], env=env, check=True)


def crash_orphaned_runs(pool: str) -> int:
    """Mark Crashed the runs of ``pool`` still Running, Pending or Cancelling; return how many.

    Called before serve starts its workers: those runs' processes were children of the workers of a serve
    that stopped (Ctrl-C, kill, a reboot), and nothing else ends them. The crashed-run automation is
    installed anew and never saw their heartbeats, and the pool's concurrency limit counts them, so every new
    batch run would wait behind them, Late, forever. A build still waiting re-plans a crashed run's ids; the
    ledger keeps what they committed. Scheduled runs are left: they are work a build asked for. One serve
    owns its pool (it sets the pool's concurrency to its GPUs).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    live = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING])))
    in_pool = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
    crashed: set = set()
    with get_client(sync_client=True) as client:
        while runs := [r for r in client.read_flow_runs(flow_run_filter=live, work_pool_filter=in_pool, limit=200)
                       if r.id not in crashed]:  # pages of 200 (the API's most); each run once
            for run in runs:
                client.set_flow_run_state(run.id, Crashed(message="left running by a weightzoo serve that stopped; "
                                                          "no worker runs it now"), force=True)
                crashed.add(run.id)
    return len(crashed)


def start_workers(pool: str, gpus: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    """One worker per GPU; each flow-run process inherits the heartbeat frequency from the worker."""
    return [srv.start_logged([srv.PREFECT, "worker", "start", "--pool", pool, "--limit", "1", "--name", f"{pool}-{i}"],
                             {**env, "CUDA_VISIBLE_DEVICES": str(i)}, logs / f"worker-{i}.log", cwd=srv.REPO)
            for i in range(gpus)]


def serve(cfg: srv.ServerConfig, pool: str, deployment_name: str, gpus: int, logs: Path,
          data_dir: str | None = None) -> int:
    """Start the server, the pool, the deployment, the automation and the workers; run until one of them
    stops (then 1) or the process is interrupted; everything started is stopped on the way out."""
    with contextlib.ExitStack() as stack:
        cfg = server_config(cfg, data_dir, stack)
        server = stack.enter_context(srv.running_server(cfg, logs))
        env = srv.worker_env(cfg.api_url, cfg.heartbeat_s)
        setup_pool(pool, gpus, env)
        os.environ["PREFECT_API_URL"] = cfg.api_url
        deploy_finetune_batch(pool, deployment_name)
        srv.install_automation()
        orphans = crash_orphaned_runs(pool)
        if orphans:
            print(f"marked {orphans} flow run(s) of pool {pool} Crashed: left running by a serve that stopped")
        workers = start_workers(pool, gpus, env, logs)
        stack.callback(srv.stop, *workers)
        print(f"serving ({cfg.backend}): UI http://127.0.0.1:{cfg.port}  deployment finetune-batch/{deployment_name}  "
              f"{gpus} worker(s) on pool {pool}; crashed-run automation installed; logs in {logs}\n"
              f"run: PREFECT_API_URL={cfg.api_url} weightzoo build --executor deployment --deployment "
              f"finetune-batch/{deployment_name} ...  (Ctrl-C stops everything)")
        while server.alive() and all(w.poll() is None for w in workers):
            time.sleep(1)
        return 1
