"""``weightzoo fit-subspace``: the weights2weights subspace (streaming randomized PCA) of a dataset."""

from __future__ import annotations

import argparse

HELP = "Fit the PCA subspace of a dataset's weights (streaming, bounded memory)."


OPTIONS = ("block_size", "power_iters", "device", "dtype", "seed", "tasks_per_pass", "keep_work")
FLOW = ("work", "task_runner", "dask_address", "dask_workers")


def register(sub: argparse._SubParsersAction) -> None:
    from weightzoo.cli.commands.options import add_field, add_fields
    from weightzoo.flows.config import FitSubspaceConfig
    from weightzoo.tasks.subspace.config import SubspaceConfig

    p = sub.add_parser("fit-subspace", help=HELP)
    add_field(p, FitSubspaceConfig, "dataset", required=True)
    add_field(p, FitSubspaceConfig, "out", required=True)
    add_field(p, SubspaceConfig, "components", "--components", "-k")
    add_fields(p, SubspaceConfig, OPTIONS)
    add_fields(p, FitSubspaceConfig, FLOW)
    p.add_argument("--no-prefect", action="store_true",
                   help="Run in this process without Prefect (no API, no artifacts); same result.")
    p.add_argument("--preview", metavar="BASE",
                   help="Also write <out>/traversal.png: the top components, each drawn at -2, 0 and +2 std by this "
                   "base (a world base, `weightzoo base --kind world`).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weightzoo.cli.commands.options import set_fields
    from weightzoo.cli.progress import Bar, terminal_progress
    from weightzoo.errors import InputError
    from weightzoo.tasks.subspace.config import SubspaceConfig
    from weightzoo.tasks.subspace.pca import fit_subspace

    if args.no_prefect and (args.task_runner == "dask" or args.dask_address):
        raise InputError("--task-runner dask / --dask-address run the tasks through Prefect; drop --no-prefect")
    if args.dask_address and args.task_runner != "dask":
        raise InputError("--dask-address needs --task-runner dask")

    options = SubspaceConfig(**set_fields(args, ("components", *OPTIONS)))
    flow_fields = set_fields(args, FLOW)
    with terminal_progress(Bar("fit-subspace", "passes")):
        if args.no_prefect:
            result = fit_subspace(args.dataset, args.out, options, flow_fields.get("work"))
        else:
            from weightzoo.flows.config import FitSubspaceConfig
            from weightzoo.flows.fit_subspace import flow_for

            params = FitSubspaceConfig(dataset=args.dataset, out=args.out, options=options, **flow_fields)
            result = flow_for(params)(params)
    total = sum(result.explained_variance_ratio)
    print(f"wrote {result.uri}: {result.components} components of {result.rows} rows explain {total:.2%} "
          "of the standardised variance")
    if args.preview:
        from weightzoo.tasks.subspace.pca import load_subspace
        from weightzoo.tasks.world.previews import traversal_grid

        out = traversal_grid(args.preview, load_subspace(result.uri))
        print(f"wrote {out}" if out else f"no preview: {args.preview} is no world base (its pictures would be noise)")
    return 0
