"""Orchestration overhead of build_dataset, per item and per batch, with an engine that trains nothing.

    .venv/bin/python bench/orchestration.py --items 1000 10000 [--batch-size 16] [--executor local]
    PREFECT_API_URL=... .venv/bin/python bench/orchestration.py --items 64 --executor deployment --deployment finetune-batch/gpu
    .venv/bin/python bench/orchestration.py --backend sqlite postgres --workers 4 --batch-size 256 \
        --items 10000 --postgres-items 10000 50000

``--backend`` runs each backend in turn with servers of its own (``weightzoo.deployments.servers``: SQLite in one
process, or a local PostgreSQL + Redis with the API and services apart), ``--workers`` process workers
(limit 1 each) and the deployment ``finetune-batch-null/bench`` (``bench/null_worker.py``: the real
finetune-batch flow with the null engine registered in the worker's flow-run process). Each row also
counts lost ids (manifest ids not committed), duplicated ids (ids in more than one commit entry), batch
runs not Completed, and API errors in the server and worker logs ("database is locked", timeouts, 5xx).

The null engine (``bench/null_engine.py``, registered in this process only) returns zero weights of the weights2weights
SD 1.5 size (99,648 fp16 values) instantly, injected by name exactly as the real engine is. So each
batch still validates, plans, loads the (tiny) base, writes and commits a real shard, records its
items and runs as a Prefect child flow: everything but training. Manifest validation (every image
decoded) is timed separately: it runs once per build, not per batch.

The ratio compares orchestration per item with a real fine-tune per item: 800 steps x seconds per
step, measured here on the tiny model (``--measure-steps``) and, as a fixed reference, 0.12 s/step
(DESIGN.md's quiet-CPU figure for the tiny model; an SD 1.5 step on an H100 is of the same order).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

REFERENCE_S_PER_STEP = 0.12
STEPS = 800
BENCH_POOL, BENCH_DEPLOYMENT = "bench", "finetune-batch-null/bench"
# What an overloaded API or database looks like in Prefect's server, worker and client logs.
API_ERRORS = re.compile(r"database is locked|TimeoutError|timed out|ReadTimeout|PoolTimeout|QueuePool limit|"
                        r"50[0-4] (Internal Server Error|Bad Gateway|Service Unavailable|Gateway Timeout)", re.I)


def measure_step_seconds(base: str, manifest: str, steps: int) -> float:
    """Seconds per optimiser step of the real engine on the tiny model, one item, class latents cached."""
    from weightzoo.tasks.finetune.readers import read_manifest
    from weightzoo.tasks.finetune.row import manifest_folder
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.engine import finetune_batch

    pipe = load_base(base)
    row = read_manifest(manifest)[:1]
    cfg = FinetuneConfig(steps=steps, num_class_images=4, class_inference_steps=2, pack=1)
    cache = tempfile.mkdtemp()
    finetune_batch(pipe, row, cfg.model_copy(update={"steps": 1}), base_uri=manifest_folder(manifest), cache_dir=cache)
    t0 = time.perf_counter()
    finetune_batch(pipe, row, cfg, base_uri=manifest_folder(manifest), cache_dir=cache)
    return (time.perf_counter() - t0) / steps


def id_counts(dataset: str, manifest_ids: list[str]) -> dict:
    """Lost ids (in the manifest, not committed) and duplicated ids (in more than one commit entry)."""
    from weightzoo.storage.ledger import Ledger

    raw = [i for c in Ledger(dataset).commits() for i in c.ids]
    return {"lost": len(set(manifest_ids) - set(raw)), "dup": len(raw) - len(set(raw))}


def run_build(args: argparse.Namespace, items: int, work: Path, base: str) -> dict:
    from null_engine import register_null_engine

    from weightzoo.flows.build_dataset import BuildIncomplete, build_dataset
    from weightzoo.flows.config import BuildConfig
    from weightzoo.tasks.finetune.manifest import load_and_validate
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    manifest = write_demo_manifest(str(work / f"m{items}"), items, images_per_subject=1, size=32)
    t0 = time.perf_counter()
    ids = [r.id for r in load_and_validate(manifest)]
    validate_s = time.perf_counter() - t0
    dataset = str(work / f"ds{items}")
    req = BuildConfig(manifest=manifest, base=base, dataset=dataset, batch_size=args.batch_size,
                       executor=args.executor, deployment=args.deployment, engine=register_null_engine(), poll_s=1,
                       rounds=1)  # a lost batch must show as lost here, not be quietly re-planned
    t0 = time.perf_counter()
    try:
        summary = build_dataset(req)
        failed_parent = 0
    except BuildIncomplete as exc:  # some ids not committed: the summary still says which batch runs were lost
        summary, failed_parent = exc.summary, 0
    except Exception as exc:  # an API error in the parent is a result of this bench, not a crash of it
        print(f"build of {items} raised {type(exc).__name__}: {exc}", file=sys.stderr)
        summary, failed_parent = {"batches": {}}, 1
    total_s = time.perf_counter() - t0
    batches = max(len(summary["batches"]), 1)
    counts = id_counts(dataset, ids)
    shutil.rmtree(dataset, ignore_errors=True)  # 200 KB per row adds up
    shutil.rmtree(work / f"m{items}", ignore_errors=True)
    return {"items": items, "batches": batches, "validate_s": validate_s, "total_s": total_s,
            "per_batch_s": (total_s - validate_s) / batches, "per_item_s": total_s / items, **counts,
            "not_completed": sum(1 for v in summary["batches"].values() if v != "COMPLETED") + failed_parent}


def count_api_errors(logs: list[Path]) -> Counter:
    """Lines in the server and worker logs that say the API or its database was overloaded, by kind."""
    kinds: Counter = Counter()
    for log in logs:
        with contextlib.suppress(FileNotFoundError), open(log, errors="replace") as f:
            kinds.update(m.group(0).lower() for m in map(API_ERRORS.search, f) if m)
    return kinds


@contextlib.contextmanager
def managed_backend(backend: str, workers: int, work: Path) -> Iterator[list[Path]]:
    """A server of ``backend`` (weightzoo.deployments.servers), the null-engine deployment and ``workers`` process workers,
    all stopped on exit; yields the log files to scan for API errors. PREFECT_API_URL points at it meanwhile."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from weightzoo.deployments import servers as srv
    from weightzoo.deployments.deploy import deploy_finetune_batch
    from weightzoo.deployments.net import free_port

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from null_worker import ENTRYPOINT

    root = Path(tempfile.mkdtemp(prefix=f"wz-bench-{backend}-"))  # /tmp: the postgres user must reach it
    root.chmod(0o711)
    logs = root / "logs"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        urls = stack.enter_context(srv.local_services(root / "services")) if backend == "postgres" else (None, None)
        cfg = srv.ServerConfig(backend=backend, port=free_port(), database_url=urls[0], redis_url=urls[1],
                               home=root / "home")
        stack.enter_context(srv.running_server(cfg, logs))
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: cfg.api_url}))
        stack.callback(srv.drain_queues)  # runs first on exit, while the server still answers
        env = srv.worker_env(cfg.api_url, PREFECT_HOME=str(root / "client"), PREFECT_LOGGING_LEVEL="WARNING")
        subprocess.run([srv.PREFECT, "work-pool", "create", BENCH_POOL, "--type", "process", "--overwrite"],
                       env=env, check=True, capture_output=True)
        deploy_finetune_batch(BENCH_POOL, name="bench", entrypoint=ENTRYPOINT)
        procs = [srv.start_logged([srv.PREFECT, "worker", "start", "--pool", BENCH_POOL, "--limit", "1",
                                   "--name", f"bench-{i}"], env, logs / f"worker-{i}.log", cwd=srv.REPO)
                 for i in range(workers)]
        stack.callback(srv.stop, *procs)
        yield sorted(logs.glob("*.log"))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--batch-size", type=int, default=None, help="Default: the flows' default batch size.")
    ap.add_argument("--executor", choices=["local", "deployment"], default="local")
    ap.add_argument("--deployment", default="finetune-batch/gpu")
    ap.add_argument("--backend", choices=["sqlite", "postgres"], nargs="+", default=None,
                    help="Run each backend with its own server, workers and the null-engine deployment "
                         "(implies --executor deployment).")
    ap.add_argument("--workers", type=int, default=4, help="With --backend: process workers, limit 1 each (default 4).")
    ap.add_argument("--postgres-items", type=int, nargs="+", default=None,
                    help="With --backend postgres: its sizes (default: --items).")
    ap.add_argument("--measure-steps", type=int, default=10, help="Real-engine steps timed for s/step (0: skip).")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.backend:
        args.executor, args.deployment = "deployment", BENCH_DEPLOYMENT
    return args


def run_backends(args: argparse.Namespace, work: Path, base: str) -> list[dict]:
    """Every size on every backend, each backend on servers and workers of its own."""
    rows = []
    for backend in args.backend:
        sizes = (args.postgres_items or args.items) if backend == "postgres" else args.items
        with managed_backend(backend, args.workers, work) as logs:
            for n in sizes:
                before = count_api_errors(logs)
                row = run_build(args, n, work, base)
                kinds = count_api_errors(logs) - before
                rows.append({**row, "backend": backend, "api_errors": sum(kinds.values()), "api_error_kinds": dict(kinds)})
                print(f"{backend} {n}: {rows[-1]}", flush=True)
    return rows


def print_table(args: argparse.Namespace, rows: list[dict], real_item: dict, s_per_step: float) -> None:
    workers = args.workers if args.backend else 1
    print(f"\nexecutor={args.executor}  batch size={args.batch_size}  workers={workers}  cores={os.cpu_count()}  "
          f"real fine-tune/item: {real_item['measured']:.1f} s measured ({s_per_step:.3f} s/step x {STEPS}), "
          f"{real_item['reference']:.0f} s reference ({REFERENCE_S_PER_STEP} s/step x {STEPS})")
    print("| backend | items | batches | validate s | total s | s/batch | s/item | worker-s/item | % of measured fine-tune "
          "| % of reference | lost | dup | runs not completed | API errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_item = r["per_item_s"] * workers  # each worker stands for a GPU: its idle time is the overhead
        print(f"| {r.get('backend', '-')} | {r['items']:,} | {r['batches']} | {r['validate_s']:.1f} | {r['total_s']:.1f} "
              f"| {r['per_batch_s']:.2f} | {r['per_item_s']:.3f} | {per_item:.3f} | {100 * per_item / real_item['measured']:.3f}% "
              f"| {100 * per_item / real_item['reference']:.3f}% | {r['lost']} | {r['dup']} | {r['not_completed']} "
              f"| {r.get('api_errors', '-')} |")


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # console logging is not what is measured
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: telemetry only errors
    if args.executor == "local" or args.backend:  # a private home: ~/.prefect's SQLite file may be busy
        os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="wz-bench-prefect-")
    from weightzoo.tasks.finetune.contract import DEFAULT_BATCH_SIZE
    from weightzoo.tasks.identity.base_model import save_tiny_pipeline
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wz-bench-"))
    base = str(save_tiny_pipeline(work / "base"))
    s_per_step = measure_step_seconds(base, write_demo_manifest(str(work / "m-step"), 1), args.measure_steps) \
        if args.measure_steps else float("nan")
    real_item = {"measured": STEPS * s_per_step, "reference": STEPS * REFERENCE_S_PER_STEP}

    def run(items: int) -> dict:
        if args.executor == "local":
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=240):  # a private ephemeral API per size
                return run_build(args, items, work, base)
        return run_build(args, items, work, base)

    rows = run_backends(args, work, base) if args.backend else [run(n) for n in args.items]
    print_table(args, rows, real_item, s_per_step)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
