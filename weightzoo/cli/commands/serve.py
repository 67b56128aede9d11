"""``weightzoo serve``: everything one GPU box needs for ``weightzoo build --executor deployment``.

Starts a Prefect server on loopback (``--backend sqlite``, the default: one process; ``--backend postgres``:
PostgreSQL + Redis, migrations as their own step, the API and the background services as separate
processes, see :mod:`weightzoo.deployments.servers`), creates the ``gpu`` process work pool, deploys finetune-batch
from this checkout, installs the crashed-run automation, and starts one process worker per GPU (each
pinned with CUDA_VISIBLE_DEVICES and ``--limit 1``, so concurrency = number of GPUs; each flow run sends
heartbeats). ``--print`` only prints the equivalent commands. The setup itself is
:mod:`weightzoo.deployments.deploy`; this module only handles the arguments.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from weightzoo.deployments import servers as srv

HELP = "Start a local Prefect server, the gpu work pool, workers, and the finetune-batch deployment."
# docs/BENCHMARKS.md: with 4 workers on SQLite, 2 of 40 batch runs were lost to locks
SQLITE_MAX_WORKERS = 2


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


def sqlite_warning(backend: str, workers: int) -> str | None:
    """The one warning for many workers on the embedded SQLite database, which locks under their writes."""
    if backend != "sqlite" or workers <= SQLITE_MAX_WORKERS:
        return None
    return (f"warning: {workers} workers on SQLite: its writes lock ('database is locked') and batch runs get lost "
            f"beyond {SQLITE_MAX_WORKERS} workers; use --backend postgres (docs/BENCHMARKS.md)")


def run(args: argparse.Namespace) -> int:
    from weightzoo.deployments import deploy

    gpus = args.gpus or deploy.gpu_count()
    warning = sqlite_warning(args.backend, gpus)
    if warning:
        print(warning, file=sys.stderr)
    if args.print_only:
        print("\n".join(deploy.commands(args.port, args.pool, gpus, args.backend, args.heartbeat_s)))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the children too, as Ctrl-C does
    cfg = srv.from_environment(args.backend, port=args.port, heartbeat_s=args.heartbeat_s,
                               database_url=args.database_url, redis_url=args.redis_url)
    logs = Path(tempfile.mkdtemp(prefix="weightzoo-serve-"))
    return deploy.serve(cfg, args.pool, args.deployment_name, gpus, logs, args.data_dir)
