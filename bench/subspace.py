"""Streaming randomized PCA (weightzoo) versus sklearn IncrementalPCA and torch.svd_lowrank, one run.

    python bench/subspace.py [--rows 4000] [--dim 20000] [--components 64] [--power-iters 5] [--block-size B]
    python bench/subspace.py --memory [--memory-rows 2000,8000] [--dim 100000]

Writes one synthetic dataset (N × D fp16 rows: a power-law spectrum of rank ``--rank`` plus noise, as
real weight spectra decay slowly) as real shards, then fits each method in its own subprocess so its
peak RSS (``VmHWM``) is its own. weightzoo streams the shards (q + 2 passes, I/O included); the
baselines get the standardised N × D float32 matrix in memory (reading it is timed separately). The
reference is exact: eigh (float64) of the Gram matrix Z Zᵀ (computed with float32 BLAS). Prints seconds, peak RSS, the largest
relative error of the top-k explained variance, and the smallest cosine of the principal angles.

``--memory`` fits only weightzoo at several N (same D) and prints peak RSS per N: it must stay flat,
since nothing in the fit grows with N (the N × k coordinates are streamed shard by shard).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from weightzoo.storage.layout import Layout
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.shards import RowMeta
from weightzoo.storage.writer import commit_batch

# -- data --------------------------------------------------------------------------------------------------


def write_dataset(uri: str, rows: int, dim: int, rank: int, shard_rows: int, row_group: int, dtype: str) -> None:
    """Shard by shard, never the whole matrix: x = u · s · Vᵀ + noise, s ∝ i^-0.7, columns of varied scale."""
    g = torch.Generator().manual_seed(0)
    v = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0]
    s = 50.0 * torch.arange(1, rank + 1, dtype=torch.float32) ** -0.7
    col_scale = 0.01 * torch.rand(dim, generator=g) + 0.005
    col_shift = 0.01 * torch.randn(dim, generator=g)
    layout = Layout(("w",), ((dim,),), dtype)
    ledger = Ledger(uri)
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        x = (torch.randn(n, rank, generator=g) * s) @ v.T + 0.3 * torch.randn(n, dim, generator=g)
        x = x * col_scale + col_shift
        meta = [RowMeta(f"r{i:07d}") for i in range(start, start + n)]
        batch = f"b{start:07d}"
        commit_batch(ledger, batch, layout, meta, x, row_group_size=row_group)


def load_standardised(uri: str) -> torch.Tensor:
    """The whole standardised matrix in memory (float32): what the in-memory baselines need."""
    from weightzoo.storage.dataset import Dataset

    ds = Dataset(uri)
    x = torch.cat([ds.layout.as_tensor(w).float() for _, w in ds.iter_batches(columns=["id"])])
    mean = x.mean(0, dtype=torch.float64).float()
    std = x.double().std(0, correction=0).float()
    return (x - mean).div_(torch.where(std > 0, std, torch.ones_like(std)))


# -- one method per subprocess -----------------------------------------------------------------------------


def run_method(method: str, uri: str, k: int, opts: dict, out: str) -> dict:
    """Fit with one method; save its top-k S² and components to ``out``; return timings."""
    t0 = time.perf_counter()
    load = 0.0
    if method == "weightzoo":
        from weightzoo.tasks.subspace.config import SubspaceConfig
        from weightzoo.tasks.subspace.pca import fit_subspace, load_subspace

        fit_subspace(uri, out + "-sub", SubspaceConfig(components=k, block_size=opts["block_size"],
                                                        power_iters=opts["power_iters"], device="cpu"))
        sub = load_subspace(out + "-sub")
        s2, comps = sub.singular_values.double().square(), sub.components
    else:
        z = load_standardised(uri)
        load = time.perf_counter() - t0
        if method == "svd_lowrank":
            _, s, v = torch.svd_lowrank(z, q=k + opts["oversample"], niter=opts["lowrank_iters"])
            s2, comps = s[:k].double().square(), v[:, :k].T
        elif method == "ipca":
            from sklearn.decomposition import IncrementalPCA  # imported (untimed) at child start

            ipca = IncrementalPCA(n_components=k, batch_size=max(k + opts["oversample"], 500), copy=False).fit(z.numpy())
            s2, comps = torch.from_numpy(ipca.singular_values_).double().square(), torch.from_numpy(ipca.components_)
        elif method == "exact":  # Gram Z Zᵀ with float32 BLAS (4x faster than float64), eigh in float64
            evals, u = torch.linalg.eigh((z @ z.T).double())
            evals, u = evals.flip(0)[:k], u.flip(1)[:, :k]
            s2, comps = evals, (z.T @ u.float()).double().div_(evals.sqrt()).T
        else:
            raise ValueError(method)
    seconds = time.perf_counter() - t0
    np.save(out + "-s2.npy", s2.numpy())
    np.save(out + "-comps.npy", comps.float().numpy())
    return {"seconds": seconds, "load_seconds": load, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's ``ru_maxrss`` survives fork + exec, so a child would report at
    least its parent's RSS at the fork; ``VmHWM`` belongs to the process's own address space."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def method_options(args: argparse.Namespace, power_iters: int | None = None) -> dict:
    """weightzoo's block Krylov settings and the classical randomized SVD's (svd_lowrank, IPCA batch)."""
    q = power_iters if power_iters is not None else int(args.power_iters.split(",")[0])
    return {"block_size": args.block_size, "power_iters": q, "oversample": args.oversample,
            "lowrank_iters": args.lowrank_iters}


def expand_methods(args: argparse.Namespace) -> list[tuple[str, str, int | None]]:
    """(label, method, q): weightzoo once per ``--power-iters`` value, the others once."""
    out: list[tuple[str, str, int | None]] = []
    qs = [int(q) for q in args.power_iters.split(",")]
    for m in args.methods.split(","):
        out += [(m if len(qs) == 1 else f"{m} q={q}", m, q) for q in qs] if m == "weightzoo" else [(m, m, None)]
    return out


def in_subprocess(method: str, uri: str, k: int, opts: dict, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--uri", uri, "--components", str(k), "--opts", json.dumps(opts),
           "--out", out]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def idle_rss() -> float:
    """Peak RSS of a process that only imports what the children import: the floor of every row."""
    out = subprocess.run([sys.executable, __file__, "--idle"], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


# -- the runs ----------------------------------------------------------------------------------------------


def compare(args: argparse.Namespace, tmp: str) -> None:
    uri = os.path.join(tmp, "ds")
    t = time.perf_counter()
    write_dataset(uri, args.rows, args.dim, args.rank, args.shard_rows, args.row_group, args.dtype)
    print(f"dataset: {args.rows} × {args.dim} {args.dtype}, {args.rows // args.shard_rows} shards "
          f"(written in {time.perf_counter() - t:.1f} s); k={args.components}, {method_options(args)}; "
          f"torch threads {torch.get_num_threads()}")
    results = {}
    for label, m, q in expand_methods(args):
        tag = label.replace(" ", "_").replace("=", "")
        results[label] = in_subprocess(m, uri, args.components, method_options(args, q), os.path.join(tmp, tag))
        results[label]["tag"] = tag
        print(f"  {label}: {results[label]['seconds']:.1f} s", flush=True)
    has_ref = "exact" in results  # without it (sizes where exact is too slow), only time and memory
    ref_s2 = np.load(os.path.join(tmp, "exact-s2.npy")) if has_ref else None
    ref_c = torch.from_numpy(np.load(os.path.join(tmp, "exact-comps.npy"))).double() if has_ref else None
    floor = idle_rss()
    print(f"\nidle process (imports only): {floor:.0f} MB peak RSS")
    print(f"{'method':<14} {'seconds':>8} {'of which load':>13} {'peak RSS MB':>11} {'ΔRSS MB':>8} "
          f"{'max rel EV err':>14} {'captured EV':>11} {'min cos angle':>13} {'time vs weightzoo':>17}")
    base = next((r["seconds"] for label, r in results.items() if label.startswith("weightzoo")), None)
    for m, r in results.items():
        err = captured = cos = float("nan")
        if has_ref:
            s2 = np.load(os.path.join(tmp, f"{r['tag']}-s2.npy"))
            comps = torch.from_numpy(np.load(os.path.join(tmp, f"{r['tag']}-comps.npy"))).double()
            err = float(np.max(np.abs(s2 - ref_s2) / ref_s2))
            # variance the method's k components capture of Z, relative to the exact top k (1 = optimal)
            captured = float(np.sum(s2) / np.sum(ref_s2))
            cos = float(torch.linalg.svdvals(comps @ ref_c.T).min())
        ratio = f"{r['seconds'] / base:.1f}x" if base else "-"
        print(f"{m:<14} {r['seconds']:>8.1f} {r['load_seconds']:>13.1f} {r['peak_rss_mb']:>11.0f} "
              f"{r['peak_rss_mb'] - floor:>8.0f} {err:>14.2e} {captured:>11.4f} {cos:>13.4f} {ratio:>17}")


def memory(args: argparse.Namespace, tmp: str) -> None:
    floor = idle_rss()
    print(f"weightzoo peak RSS vs N at D={args.dim} {args.dtype}, k={args.components}, {method_options(args)}; "
          f"idle process {floor:.0f} MB")
    print(f"{'rows':>7} {'data GB':>8} {'seconds':>8} {'peak RSS MB':>11} {'ΔRSS MB':>8}")
    for n in [int(x) for x in args.memory_rows.split(",")]:
        uri = os.path.join(tmp, f"ds-{n}")
        write_dataset(uri, n, args.dim, args.rank, args.shard_rows, args.row_group, args.dtype)
        r = in_subprocess("weightzoo", uri, args.components, method_options(args), os.path.join(tmp, f"m{n}"))
        gb = n * args.dim * Layout(("w",), ((1,),), args.dtype).itemsize / 1e9
        print(f"{n:>7} {gb:>8.2f} {r['seconds']:>8.1f} {r['peak_rss_mb']:>11.0f} {r['peak_rss_mb'] - floor:>8.0f}", flush=True)
        shutil.rmtree(uri)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=20_000)
    ap.add_argument("--rank", type=int, default=400, help="Rank of the synthetic signal (default 400).")
    ap.add_argument("--components", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=None, help="weightzoo: Krylov block b (default ⌈k/2⌉).")
    ap.add_argument("--power-iters", default="5",
                    help="weightzoo: Krylov blocks after the first (default 5); a comma list runs weightzoo once per value.")
    ap.add_argument("--oversample", type=int, default=20,
                    help="svd_lowrank: extra columns p (default 20); IncrementalPCA: batch max(k + p, 500).")
    ap.add_argument("--lowrank-iters", type=int, default=3, help="svd_lowrank: power iterations (default 3).")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--shard-rows", type=int, default=500)
    ap.add_argument("--row-group", type=int, default=128)
    ap.add_argument("--methods", default="exact,weightzoo,svd_lowrank,ipca",
                    help="Comma-separated; 'exact' is the reference (leave it out where it is too slow: no errors then).")
    ap.add_argument("--memory", action="store_true", help="Peak RSS of weightzoo versus N instead.")
    ap.add_argument("--memory-rows", default="2000,8000")
    ap.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir).")
    ap.add_argument("--threads", type=int, default=None,
                    help="Threads for every method (torch and BLAS); default: the libraries' own choice.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:  # children inherit the environment; BLAS reads it at import
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
        torch.set_num_threads(args.threads)
    if args.child or args.idle:
        import sklearn.decomposition  # noqa: F401 - every child pays this import before timing, so RSS floors agree

        import weightzoo.tasks.subspace.pca  # noqa: F401
    if args.idle:
        print(peak_rss_mb())
        return
    if args.child:
        print(json.dumps(run_method(args.child, args.uri, args.components, json.loads(args.opts), args.out)))
        return
    tmp = tempfile.mkdtemp(dir=args.dir)
    try:
        memory(args, tmp) if args.memory else compare(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
