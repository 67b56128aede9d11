"""``weightzoo serve``: everything one GPU box needs for ``weightzoo build --executor deployment``.

Starts a Prefect server on loopback, creates the ``gpu`` process work pool, deploys finetune-batch
from this checkout, and starts one process worker per GPU (each pinned with CUDA_VISIBLE_DEVICES
and ``--limit 1``, so concurrency = number of GPUs). ``--print`` only prints the equivalent commands.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from weightzoo.net import wait_healthy

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = "flows/finetune_batch.py:finetune_batch"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="Start a local Prefect server, the gpu work pool, workers, and the finetune-batch deployment.")
    p.add_argument("--port", type=int, default=4200, help="Server port on 127.0.0.1 (default 4200).")
    p.add_argument("--pool", default="gpu", help="Process work pool name (default gpu).")
    p.add_argument("--deployment-name", default="gpu", help="Deployment name: runs are 'finetune-batch/<name>'.")
    p.add_argument("--gpus", type=int, default=None, help="Workers to start, one per GPU (default: GPUs seen, at least 1).")
    p.add_argument("--print", dest="print_only", action="store_true", help="Print the commands instead of running them.")
    p.set_defaults(func=run)


def gpu_count() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def commands(port: int, pool: str, gpus: int) -> list[str]:
    """The shell commands ``serve`` runs, in order (each long-running one in its own terminal)."""
    api = f"http://127.0.0.1:{port}/api"
    lines = [
        f"prefect server start --host 127.0.0.1 --port {port}",
        f"export PREFECT_API_URL={api}",
        f"prefect work-pool create {pool} --type process --overwrite",
        f"prefect work-pool set-concurrency-limit {pool} {gpus}",
        f"cd {REPO} && prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml",
    ]
    lines += [f"CUDA_VISIBLE_DEVICES={i} prefect worker start --pool {pool} --limit 1 --name {pool}-{i}" for i in range(gpus)]
    return lines


def deploy_finetune_batch(pool: str, name: str = "gpu", concurrency_limit: int | None = None) -> str:
    """Create (or update) the finetune-batch deployment from this checkout on ``pool``; returns its id.

    The source is this folder (no git pull, no image): workers on this box run the code as it is here.
    """
    from prefect import flow

    deployable = flow.from_source(source=str(REPO), entrypoint=ENTRYPOINT)
    return str(deployable.deploy(name=name, work_pool_name=pool, concurrency_limit=concurrency_limit,
                                 build=False, push=False, print_next_steps=False))


def run(args: argparse.Namespace) -> int:
    gpus = args.gpus or gpu_count()
    if args.print_only:
        print("\n".join(commands(args.port, args.pool, gpus)))
        return 0
    api = f"http://127.0.0.1:{args.port}/api"
    env = {**os.environ, "PREFECT_API_URL": api}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the children too, as Ctrl-C does
    prefect = str(Path(sys.executable).with_name("prefect"))
    procs = [subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(args.port)], env=env)]
    try:
        wait_healthy(f"{api}/health")
        subprocess.run([prefect, "work-pool", "create", args.pool, "--type", "process", "--overwrite"], env=env, check=True)
        subprocess.run([prefect, "work-pool", "set-concurrency-limit", args.pool, str(gpus)], env=env, check=True)
        os.environ["PREFECT_API_URL"] = api
        deploy_finetune_batch(args.pool, args.deployment_name)
        for i in range(gpus):
            procs.append(subprocess.Popen(
                [prefect, "worker", "start", "--pool", args.pool, "--limit", "1", "--name", f"{args.pool}-{i}"],
                env={**env, "CUDA_VISIBLE_DEVICES": str(i)}, cwd=REPO,
            ))
        print(f"serving: UI http://127.0.0.1:{args.port}  deployment finetune-batch/{args.deployment_name}  "
              f"{gpus} worker(s) on pool {args.pool}\n"
              f"run: PREFECT_API_URL={api} weightzoo build --executor deployment --deployment "
              f"finetune-batch/{args.deployment_name} ...  (Ctrl-C stops everything)")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return 1
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a worker polling a server that is already gone
                p.kill()
                p.wait()
