"""``weightzoo fit-subspace``: the weights2weights subspace (streaming randomized PCA) of a dataset."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-subspace", help="Fit the PCA subspace of a dataset's weights (streaming, bounded memory).")
    p.add_argument("--dataset", required=True, help="Dataset URI (local path or s3://bucket/prefix).")
    p.add_argument("--out", required=True, help="Subspace URI to write (subspace.safetensors, coords.parquet, card.json).")
    p.add_argument("--components", "-k", type=int, default=64, help="Principal components k (default 64).")
    p.add_argument("--block-size", type=int, default=None,
                   help="Columns b per Krylov block, one pass over the data each (default ⌈k/2⌉).")
    p.add_argument("--power-iters", type=int, default=5,
                   help="Krylov blocks q after the first: q + 1 passes, Krylov width (q + 1)·b (default 5).")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', ... (default auto).")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="Matmul dtype (default float32).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random test matrix (default 0).")
    p.add_argument("--work", help="Work URI for partial results (default <out>/_work/<token>).")
    p.add_argument("--tasks-per-pass", type=int, default=8,
                   help="Shard groups per pass: parallel tasks, one D×b partial file each (default 8).")
    p.add_argument("--no-prefect", action="store_true",
                   help="Run in this process without Prefect (no API, no artifacts); same result.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weightzoo.tasks.subspace.pca import SubspaceOptions, fit_subspace

    options = SubspaceOptions(components=args.components, block_size=args.block_size, power_iters=args.power_iters,
                              device=args.device, dtype=args.dtype, seed=args.seed, tasks_per_pass=args.tasks_per_pass)
    if args.no_prefect:
        result = fit_subspace(args.dataset, args.out, options, args.work)
    else:
        from weightzoo.flows.fit_subspace import FitSubspaceParams
        from weightzoo.flows.fit_subspace import fit_subspace as flow

        result = flow(FitSubspaceParams(dataset=args.dataset, out=args.out, work=args.work, options=options))
    total = sum(result.explained_variance_ratio)
    print(f"wrote {result.uri}: {result.components} components of {result.rows} rows explain {total:.2%} "
          "of the standardised variance")
    return 0
