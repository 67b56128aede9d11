"""``weightzoo serve``: everything one GPU box needs for ``weightzoo build --executor deployment``.

Starts a Prefect server on loopback (``--backend sqlite``, the default: one process; ``--backend postgres``:
PostgreSQL + Redis, migrations as their own step, the API and the background services as separate
processes, see :mod:`weightzoo.deployments.servers`), creates the ``gpu`` process work pool, deploys finetune-batch
from this checkout, installs the crashed-run automation, and starts one process worker per GPU (each
pinned with CUDA_VISIBLE_DEVICES and ``--limit 1``, so concurrency = number of GPUs; each flow run sends
heartbeats). ``--print`` only prints the equivalent commands.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr

from weightzoo.deployments import servers as srv
from weightzoo.storage.fs import redact

HELP = "Start a local Prefect server, the gpu work pool, workers, and the finetune-batch deployment."

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = "flows/finetune_batch.py:finetune_batch"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=HELP)
    p.add_argument("--port", type=int, default=4200, help="Server port on 127.0.0.1.")
    p.add_argument("--pool", default="gpu", help="Process work pool name.")
    p.add_argument("--deployment-name", default="gpu", help="Deployment name: runs are 'finetune-batch/<name>'.")
    p.add_argument("--gpus", type=int, default=None, help="Workers to start, one per GPU (default: GPUs seen, at least 1).")
    p.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite",
                   help="sqlite: one server process, one box. postgres: PostgreSQL + Redis, API and "
                        "services as separate processes; for many workers.")
    p.add_argument("--database-url", default=None,
                   help=f"postgres: an existing postgresql:// URL (better: set {srv.DATABASE_URL_ENV}, argv is "
                        "visible to other users). Default: start PostgreSQL in --data-dir.")
    p.add_argument("--redis-url", default=None,
                   help=f"postgres: an existing redis:// URL (better: set {srv.REDIS_URL_ENV}). Default: start "
                        "redis-server in --data-dir.")
    p.add_argument("--data-dir", default=None,
                   help="postgres: folder of the local PostgreSQL and Redis (default ~/.weightzoo/serve, or "
                        "/var/lib/weightzoo/serve as root: the postgres user must reach it).")
    p.add_argument("--heartbeat-s", type=int, default=srv.HEARTBEAT_S,
                   help="Seconds between flow-run heartbeats (>= 30); runs silent for "
                        "3 of them are marked Crashed.")
    p.add_argument("--print", dest="print_only", action="store_true", help="Print the commands instead of running them.")
    p.set_defaults(func=run)


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
        f"cd {REPO} && prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml",
        f"prefect automation create --from-file {srv.CRASH_AUTOMATION.relative_to(REPO)}",
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

    deployable = flow.from_source(source=str(REPO), entrypoint=entrypoint)
    return str(deployable.deploy(name=name, work_pool_name=pool, concurrency_limit=concurrency_limit,
                                 build=False, push=False, print_next_steps=False, tags=list(srv.DEPLOYMENT_TAGS),
                                 job_variables={"env": srv.heartbeat_env()}))


def default_data_dir() -> Path:
    """Root's home is private (0700) and PostgreSQL runs as the postgres user, so root keeps data in /var/lib."""
    return Path("/var/lib/weightzoo/serve") if os.geteuid() == 0 else Path.home() / ".weightzoo" / "serve"


def _config(args: argparse.Namespace, stack: contextlib.ExitStack) -> srv.ServerConfig:
    """The server config; with the postgres backend and no URLs, start PostgreSQL / Redis in the data folder."""
    cfg = srv.from_environment(args.backend, port=args.port, heartbeat_s=args.heartbeat_s,
                               database_url=args.database_url, redis_url=args.redis_url)
    if cfg.backend == "sqlite" or (cfg.database_url and cfg.redis_url):
        return cfg
    data = Path(args.data_dir) if args.data_dir else default_data_dir()
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


def _setup_pool(pool: str, gpus: int, env: dict[str, str]) -> None:
    prefect = srv.PREFECT
    subprocess.run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env, check=True)
    subprocess.run([prefect, "work-pool", "set-concurrency-limit", pool, str(gpus)], env=env, check=True)


def _start_workers(pool: str, gpus: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    """One worker per GPU; each flow-run process inherits the heartbeat frequency from the worker."""
    return [srv.start_logged([srv.PREFECT, "worker", "start", "--pool", pool, "--limit", "1", "--name", f"{pool}-{i}"],
                             {**env, "CUDA_VISIBLE_DEVICES": str(i)}, logs / f"worker-{i}.log", cwd=REPO)
            for i in range(gpus)]


SQLITE_MAX_WORKERS = 2  # docs/BENCHMARKS.md: with 4 workers on SQLite, 2 of 40 batch runs were lost to locks


def sqlite_warning(backend: str, workers: int) -> str | None:
    """The one warning for many workers on the embedded SQLite database, which locks under their writes."""
    if backend != "sqlite" or workers <= SQLITE_MAX_WORKERS:
        return None
    return (f"warning: {workers} workers on SQLite: its writes lock ('database is locked') and batch runs get lost "
            f"beyond {SQLITE_MAX_WORKERS} workers; use --backend postgres (docs/BENCHMARKS.md)")


def run(args: argparse.Namespace) -> int:
    gpus = args.gpus or gpu_count()
    warning = sqlite_warning(args.backend, gpus)
    if warning:
        print(warning, file=sys.stderr)
    if args.print_only:
        print("\n".join(commands(args.port, args.pool, gpus, args.backend, args.heartbeat_s)))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the children too, as Ctrl-C does
    logs = Path(tempfile.mkdtemp(prefix="weightzoo-serve-"))
    with contextlib.ExitStack() as stack:
        cfg = _config(args, stack)
        server = stack.enter_context(srv.running_server(cfg, logs))
        env = srv.worker_env(cfg.api_url, cfg.heartbeat_s)
        _setup_pool(args.pool, gpus, env)
        os.environ["PREFECT_API_URL"] = cfg.api_url
        deploy_finetune_batch(args.pool, args.deployment_name)
        srv.install_automation()
        workers = _start_workers(args.pool, gpus, env, logs)
        stack.callback(lambda: [srv.stop(w) for w in workers])
        print(f"serving ({cfg.backend}): UI http://127.0.0.1:{args.port}  deployment finetune-batch/{args.deployment_name}  "
              f"{gpus} worker(s) on pool {args.pool}; crashed-run automation installed; logs in {logs}\n"
              f"run: PREFECT_API_URL={cfg.api_url} weightzoo build --executor deployment --deployment "
              f"finetune-batch/{args.deployment_name} ...  (Ctrl-C stops everything)")
        while server.alive() and all(w.poll() is None for w in workers):
            time.sleep(1)
        return 1
