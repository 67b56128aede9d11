"""A small build's wall time idle and beside two CPU-bound processes, with the CPU share the build got.

    .venv/bin/python bench/load.py [--rows 4] [--steps 20] [--threads auto 2] [--settle-s 20]

Each run is a real ``weightzoo build`` process on the embedded default (its own temporary Prefect server,
local disk) on the tiny base, into a fresh dataset; the Prefect home is shared and made once before the
first run, so every run starts its server on an existing database. ``--threads auto`` is the CLI's own
choice (``tasks/device.py`` ``cpu_threads``, computed here at launch and passed as ``OMP_NUM_THREADS`` so the
table can say what it was); a number pins it (2 = torch's default on 2 cores, the behaviour before).

"Busy" runs start two CPU-bound processes ``--settle-s`` seconds before the build and stop them after it
(each also stops itself after ``--busy-limit-s``). The CPU share is the build's process tree's CPU seconds
(its temporary server included) over its wall time: cores it kept busy on average. Where the ratio of wall
times is near the ratio of CPU shares, the build loses only the CPU it had to share; a ratio far above it
is time lost to waiting (spinning threads descheduled for a neighbour).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# CPU-bound until the time limit, or until the bench that started it is gone (its parent changes).
BUSY = ("import os, time\nparent, end = os.getppid(), time.monotonic() + {limit}\n"
        "while time.monotonic() < end and os.getppid() == parent:\n    pass\n")


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _prepare(work: Path, rows: int) -> tuple[str, str, dict[str, str]]:
    """The tiny base, a manifest of ``rows`` subjects and a Prefect home whose database exists already."""
    os.environ.pop("PREFECT_API_URL", None)  # set before Prefect is imported: it reads its settings once
    os.environ |= {"PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    from prefect.server.api.server import SubprocessASGIServer

    from weightzoo.tasks.identity.base_model import save_tiny_pipeline
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    base = str(save_tiny_pipeline(work / "tiny"))
    manifest = write_demo_manifest(str(work / "m"), rows, images_per_subject=1, size=32)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    server = SubprocessASGIServer()
    server.start(timeout=600)  # makes the database once: later starts are what a user's second build sees
    server.stop()
    return base, manifest, env


def _run(args: argparse.Namespace, base: str, manifest: str, env: dict[str, str], threads: str, busy: bool,
         work: Path, n: int) -> dict:
    from weightzoo.tasks.device import busy_elsewhere, cpu_threads

    procs = []
    if busy:
        procs = [subprocess.Popen([sys.executable, "-c", BUSY.format(limit=args.busy_limit_s)]) for _ in range(2)]
        time.sleep(args.settle_s)
    load, others = os.getloadavg()[0], busy_elsewhere()
    chosen = cpu_threads(busy=others) if threads == "auto" else int(threads)
    finetune = {"steps": args.steps, "pack": args.rows, "num_class_images": 1, "class_inference_steps": 1,
                "check_every": 10}
    cmd = [sys.executable, "-m", "weightzoo.cli", "build", "--manifest", manifest, "--base", base,
           "--dataset", str(work / f"ds-{n}"), "--batch-size", str(args.rows), "--finetune-json", json.dumps(finetune)]
    cpu0, t0 = _cpu_children(), time.perf_counter()
    out = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": str(chosen)}, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - cpu0  # before the busy processes are reaped
    for p in procs:
        p.terminate()
        p.wait()
    if out.returncode != 0:
        raise SystemExit(f"build failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
    return {"threads": threads, "chosen": chosen, "busy": busy, "load": load, "others": others,
            "wall": wall, "cpu": cpu, "share": cpu / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4, help="manifest rows, one batch, one pack")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", nargs="+", default=["auto", "2"], help="'auto' (the CLI's choice) or a number")
    p.add_argument("--settle-s", type=float, default=20.0, help="seconds the busy processes run before the build")
    p.add_argument("--busy-limit-s", type=float, default=600.0, help="each busy process stops itself after this")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wz-load-"))
    base, manifest, env = _prepare(work, args.rows)
    print(f"machine: {os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}; {args.rows} rows x "
          f"{args.steps} steps on the tiny base, one batch; wall = the whole `weightzoo build` process", flush=True)
    results = []
    for threads in args.threads:
        for busy in (False, True):
            r = _run(args, base, manifest, env, threads, busy, work, len(results))
            results.append(r)
            print(f"  threads={threads} ({r['chosen']}) busy={busy}: {r['wall']:.1f} s wall, {r['cpu']:.1f} CPU s, "
                  f"share {r['share']:.2f} cores, load {r['load']:.1f} (others {r['others']:.1f})", flush=True)
    print("\n| threads (chosen) | neighbours | load avg at start | wall s | CPU s | CPU share (cores) "
          "| wall busy/idle | share idle/busy |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        idle, loaded = (next(r for r in results if r["threads"] == threads and r["busy"] is b) for b in (False, True))
        for r in (idle, loaded):
            ratio = f"{loaded['wall'] / idle['wall']:.2f}" if r is loaded else ""
            shares = f"{idle['share'] / loaded['share']:.2f}" if r is loaded else ""
            print(f"| {threads} ({r['chosen']}) | {'2 busy' if r['busy'] else 'none'} | {r['load']:.1f} "
                  f"| {r['wall']:.1f} | {r['cpu']:.1f} | {r['share']:.2f} | {ratio} | {shares} |")


if __name__ == "__main__":
    main()
