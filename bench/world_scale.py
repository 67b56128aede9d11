"""The trend with scale: weights2weights' claims on the first 128, 256, 512 and 1,024 rows of one world dataset.

The dataset is built through the real pipeline, as a user's would be: ``weightzoo serve`` (a Prefect server on
loopback, the gpu work pool, the finetune-batch deployment, ``--workers`` process workers, each flow run on
one torch thread) and ``weightzoo build --executor deployment`` with the world's LoRA recipe
(tasks/world/config.py ``WORLD_FINETUNE``). Rerunning resumes the build (the ledger keeps what was committed;
a stopped bench loses nothing). The build's own figures: wall seconds and seconds per row, ids committed,
failed and pending, batch runs not completed, ids committed twice.

Then, for each ``--sizes`` N, the first N manifest rows are copied into a dataset of their own, a subspace of
k = min(``--components``, N - 1) is fitted on it, and measured with the pixel reader as bench/identity_world.py
does (the same functions): sample validity, edit accuracy and preservation at ``--strength``
(``--direction``'s edit, as ``weightzoo edit`` makes it, and a random one), the ceiling (the edited
identities' own LoRAs), and the directions' mutual correlation: the mean |cos| between the probe
directions of different attributes (weights2weights' Fig. 8: it falls as models are added). Draw 3 by default (identity_world runs 0 and 1, world_recipe 2).

    .venv/bin/python bench/world_scale.py                      # 1,024 identities (~2 h on 2 cores)
    .venv/bin/python bench/world_scale.py --identities 16 --sizes 8 16 --ft-steps 20 --samples 4   # minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
WEIGHTZOO = str(Path(sys.executable).parent / "weightzoo")


def _identity_world():
    """bench/identity_world.py's measurements (one definition of each claim)."""
    spec = importlib.util.spec_from_file_location("bench_identity_world", HERE / "identity_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(work: Path, workers: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """``weightzoo serve`` on a free port; returns the process once it says it is serving, and its API URL."""
    from weightzoo.deployments.net import free_port

    port = free_port()
    log = open(work / "serve.log", "a")  # noqa: SIM115 - open for the server's life
    proc = subprocess.Popen([WEIGHTZOO, "serve", "--port", str(port), "--gpus", str(workers)], env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        log.write(line)
        log.flush()
        if line.startswith("serving ("):
            return proc, f"http://127.0.0.1:{port}/api"
        if time.monotonic() > deadline:
            break
    stop(proc)
    raise SystemExit(f"weightzoo serve did not start: see {work / 'serve.log'}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM: serve stops its workers (together, <= 30 s) and its server (<= 30 s) on the way out."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def build(args, work: Path, base: Path, manifest: Path, dataset: Path) -> dict:
    """The dataset through serve + the deployment executor; the build's summary and figures."""
    from weightzoo.storage.ledger import Ledger
    from weightzoo.tasks.world.config import WORLD_FINETUNE

    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    before = len(Ledger(str(dataset)).committed_ids()) if dataset.exists() else 0
    finetune = WORLD_FINETUNE | {"steps": args.ft_steps, "pack": 8}
    proc, api = serve(work, args.workers, env)
    try:
        t0 = time.perf_counter()
        out = subprocess.run([WEIGHTZOO, "-q", "build", "--manifest", str(manifest), "--base", str(base),
                              "--dataset", str(dataset), "--executor", "deployment", "--batch-size", str(args.batch_size),
                              "--finetune-json", json.dumps(finetune), "--json"],
                             env={**env, "PREFECT_API_URL": api}, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    finally:
        stop(proc)
    if not out.stdout.strip():
        raise SystemExit(f"weightzoo build printed no summary (exit {out.returncode}):\n{out.stderr[-2000:]}")
    summary = json.loads(out.stdout)["summary"]
    commits = Ledger(str(dataset)).commits()
    ids = [i for c in commits for i in c.ids]
    built = summary["committed"] - before
    return {"seconds": seconds, "rows_built": built, "s_per_row": seconds / built if built else float("nan"),
            "committed": summary["committed"], "failed": summary["failed"], "pending": summary["pending"],
            "total": summary["total"], "batch_runs": len(summary["batches"]),
            "batch_runs_not_completed": len(summary["batch_failures"]), "ids_committed_twice": len(ids) - len(set(ids)),
            "failures": summary["failures"][:10]}


def first_rows(dataset: str, ids: list[str], out: Path) -> str:
    """A dataset of the rows ``ids`` of ``dataset`` (copied, one shard per 256): the first N of the build."""
    from weightzoo.storage.dataset import Dataset
    from weightzoo.storage.ledger import Ledger
    from weightzoo.storage.shards import RowMeta
    from weightzoo.storage.writer import commit_batch

    ledger = Ledger(str(out))
    if ledger.exists() and len(ledger.committed_ids()) == len(ids):
        return str(out)
    ds = Dataset(dataset)
    fields = [f for f in RowMeta.__dataclass_fields__ if f != "id"]
    for start in range(0, len(ids), 256):
        chunk = ids[start : start + 256]
        rows, weights = [], []
        for item in chunk:
            meta, w = ds.row(item)
            rows.append(RowMeta(item, **{f: meta[f] for f in fields if f in meta}))
            weights.append(w)
        commit_batch(ledger, f"first-{start:05d}", ds.layout, rows, np.stack(weights))
    return str(out)


def directions_figures(sub) -> dict[str, float]:
    """The probes' mean cross-validated accuracy, and the mean |cos| between the probe directions (one per
    label) of different attributes: how entangled the attributes are in the subspace."""
    from weightzoo.tasks.subspace.w2w import probes

    found = probes(sub)
    dirs = {a: [p.direction(v).double() for v in p.labels] for a, p in found.items()}
    cos = [abs(float(x @ y / (x.norm() * y.norm()))) for a, b in itertools.combinations(dirs, 2)
           for x in dirs[a] for y in dirs[b]]
    cv = [p.cv_accuracy for p in found.values() if p.cv_accuracy == p.cv_accuracy]  # NaN: too few rows to cross-validate
    return {"mutual_cos": float(np.mean(cos)), "probe_cv_accuracy": float(np.mean(cv)) if cv else float("nan")}


def measure(iw, data: str, pipe, args) -> dict:
    """One size's claims, as bench/identity_world.py measures them."""
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.subspace.pca import SubspaceConfig, fit_subspace, load_subspace
    from weightzoo.tasks.subspace.w2w import subspace_hparams

    rows = len(Dataset(data))
    k = min(args.components, rows - 1)
    sub_uri = f"{data}-subspace-k{k}"
    if not Path(sub_uri, "card.json").exists():
        fit_subspace(data, sub_uri, SubspaceConfig(components=k, device="cpu"))
    sub = load_subspace(sub_uri)
    hparams = subspace_hparams(sub)
    a = SimpleNamespace(samples=args.samples, pictures=args.pictures, seed=args.seed, edit_ids=args.edit_ids,
                        strengths=[args.strength], direction=args.direction)
    t0 = time.perf_counter()
    sample = iw.bench_sample(sub, pipe, hparams, a)
    edit = iw.bench_edit(sub, pipe, hparams, a)
    ceiling = iw.bench_ceiling(sub, pipe, hparams, a)
    s = f"{args.strength:g}"
    return {"rows": rows, "k": k, "sample_valid": sample["valid"], "edit_accuracy": edit[f"w2w_acc@{s}"],
            "edit_random_accuracy": edit[f"random_acc@{s}"], "edit_preservation": edit[f"w2w_keep@{s}"],
            "edit_random_preservation": edit[f"random_keep@{s}"], "ceiling": ceiling["unedited"],
            **directions_figures(sub), "seconds": time.perf_counter() - t0}


COLUMNS = ("sample_valid", "edit_accuracy", "edit_random_accuracy", "edit_preservation", "edit_random_preservation",
           "ceiling", "mutual_cos", "probe_cv_accuracy")


def plot(sizes: dict[int, dict], path: str) -> None:
    """The claims against the number of identities (log scale): the figure docs/BENCHMARKS.md keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(sizes)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key, style in (("edit_accuracy", "o-"), ("edit_random_accuracy", "o:"), ("edit_preservation", "s-"),
                       ("edit_random_preservation", "s:"), ("sample_valid", "^-"), ("mutual_cos", "d--")):
        ax.plot(ns, [sizes[n][key] for n in ns], style, label=key.replace("_", " "))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("training identities (first N rows of one build)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/world_scale")
    p.add_argument("--identities", type=int, default=1024)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024], help="first-N row counts measured")
    p.add_argument("--images", type=int, default=4, help="training images per identity")
    p.add_argument("--seed", type=int, default=3, help="the draw (identity_world runs 0 and 1, world_recipe 2)")
    p.add_argument("--workers", type=int, default=2, help="process workers of weightzoo serve, one thread each")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ft-steps", type=int, default=None, help="LoRA steps (default: the world recipe's)")
    p.add_argument("--build-only", action="store_true", help="build (or resume) the dataset, measure nothing")
    p.add_argument("--components", type=int, default=128)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--pictures", type=int, default=2)
    p.add_argument("--edit-ids", type=int, default=8)
    p.add_argument("--direction", choices=["labels", "probe"], default="labels", help="the edit measured (weightzoo edit's)")
    p.add_argument("--strength", type=float, default=None,
                   help="edit strength (default: weightzoo edit's for --direction: 1.5 labels, 4 probe)")
    p.add_argument("--json", help="write the build's figures and each size's claims to this file")
    p.add_argument("--plot", help="write the claims against the number of identities (PNG) to this file")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the measurements (not the build)")
    args = p.parse_args()
    from weightzoo.tasks.subspace.config import default_strength

    args.strength = default_strength(args.direction) if args.strength is None else args.strength
    from diffusers.utils import logging as diffusers_logging

    from weightzoo.storage.ledger import Ledger
    from weightzoo.tasks.finetune.readers import read_manifest
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.world.base import build_world_base
    from weightzoo.tasks.world.config import WORLD_FINETUNE
    from weightzoo.tasks.world.identities import write_world_manifest

    if max(args.sizes) > args.identities:
        p.error(f"--sizes {max(args.sizes)} is more than --identities {args.identities}")
    args.ft_steps = args.ft_steps or WORLD_FINETUNE["steps"]
    work = Path(args.work).resolve()
    base = build_world_base(work / "bases")
    recipe = "-".join(f"{k}{v}" for k, v in sorted((WORLD_FINETUNE | {"steps": args.ft_steps}).items()))
    data = work / f"draw{args.seed}-n{args.identities}-img{args.images}-{recipe}"
    data.mkdir(parents=True, exist_ok=True)
    manifest = data / "manifest.jsonl"
    if not manifest.exists():
        write_world_manifest(str(data), args.identities, args.images, args.seed)
    ids = [r.id for r in read_manifest(str(manifest))]
    dataset = data / "dataset"
    done = Ledger(str(dataset)).committed_ids() if dataset.exists() else set()
    report: dict = {"seed": args.seed, "identities": args.identities}
    if done >= set(ids):
        print(f"build: all {len(ids)} rows committed earlier (kept)", flush=True)
    else:
        report["build"] = build(args, work, base, manifest, dataset)
        b = report["build"]
        print(f"build: {b['rows_built']} rows in {b['seconds']:.0f} s ({b['s_per_row']:.1f} s/row, {args.workers} workers); "
              f"committed {b['committed']}, failed {b['failed']}, pending {b['pending']} of {b['total']}; "
              f"{b['batch_runs']} batch runs, {b['batch_runs_not_completed']} not completed; "
              f"ids committed twice {b['ids_committed_twice']}", flush=True)
        if b["committed"] < b["total"]:
            raise SystemExit("the build is not complete: rerun to resume it")
    if args.build_only:
        return
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    iw, pipe = _identity_world(), load_base(str(base))
    sizes = {n: measure(iw, first_rows(str(dataset), ids[:n], data / f"first{n}"), pipe, args) for n in args.sizes}
    unit = "std" if args.direction == "probe" else "x the label difference"
    print(f"\nworld scale: draw {args.seed}, edit --direction {args.direction} at {args.strength:g} {unit}, "
          f"k = min({args.components}, N - 1)")
    print("| N | k | " + " | ".join(COLUMNS) + " | s |")
    print("|---:|---:|" + "---:|" * len(COLUMNS) + "---:|")
    for n, m in sizes.items():
        print(f"| {n} | {m['k']} | " + " | ".join(f"{m[c]:.2f}" for c in COLUMNS) + f" | {m['seconds']:.0f} |")
    report["sizes"] = {str(n): m for n, m in sizes.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(sizes, args.plot)


if __name__ == "__main__":
    main()
