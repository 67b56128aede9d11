"""Prefect flow ``fit-subspace``: streaming randomized PCA over a dataset's shards.

Each pass over the weights is one task per group of shards (mapped; they run in parallel on the
flow's task runner, or on many workers), and each reduce step is one task; only file URIs travel between them,
the D×b matrices live under the work URI as safetensors. The algorithm itself is
``weightzoo.tasks.subspace.pca.fit_subspace``; this flow supplies a mapper that submits tasks.

The mapped tasks run on threads of the flow's process, or (``task_runner="dask"``) on a Dask cluster
through prefect-dask: an existing one (``dask_address``) or a local cluster of worker processes. Every
task reads its shards from the dataset URI itself, so Dask workers need the same storage access (and
the same weightzoo install), nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prefect import Flow, flow, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from weightzoo.flows.common import dataset_run_name, png_artifact, tag_run
from weightzoo.flows.config import FitSubspaceConfig
from weightzoo.storage.fs import join, redact
from weightzoo.tasks.subspace import pca as sp

# A retried group re-reads its shards: a transient storage error is worth two retries.
_GROUP_TASKS: dict[Callable[..., Any], Any] = {
    sp.group_moments: task(sp.group_moments, name="moments", task_run_name="moments-{group.name}", retries=2),
    sp.group_power: task(sp.group_power, name="power", task_run_name="power-{step}-{group.name}", retries=2),
}
_REDUCE_TASKS: dict[Callable[..., Any], Any] = {
    sp.reduce_moments: task(sp.reduce_moments, name="reduce-moments"),
    sp.initial_basis: task(sp.initial_basis, name="initial-basis"),
    sp.reduce_power: task(sp.reduce_power, name="reduce-power", task_run_name="reduce-power-{step}"),
    sp.finalise: task(sp.finalise, name="finalise"),
}


def task_runner_for(config: FitSubspaceConfig) -> TaskRunner:
    """The task runner ``config`` asks for; a local Dask cluster is loopback-only, one thread per worker
    (Dask's nanny sets OMP_NUM_THREADS=1 in each worker, so torch does not oversubscribe the cores)."""
    if config.task_runner == "threads":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": config.dask_workers, "threads_per_worker": 1, "processes": True,
                                         "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})


def flow_for(config: FitSubspaceConfig) -> Flow:
    """``fit_subspace`` with the task runner of ``config`` (the CLI runs this; a deployment run of the plain
    flow re-enters it as a subflow, since a flow's task runner is fixed before its parameters are known)."""
    if config.task_runner == "threads":
        return fit_subspace
    return fit_subspace.with_options(task_runner=task_runner_for(config))


def _needs_dask_subflow(config: FitSubspaceConfig) -> bool:
    """True when Dask was asked for but this run's tasks would go to threads (a deployment run)."""
    if config.task_runner != "dask":
        return False
    from prefect_dask import DaskTaskRunner

    ctx = FlowRunContext.get()
    return ctx is None or not isinstance(ctx.task_runner, DaskTaskRunner)


def _map_tasks(fn: Callable[..., Any], groups: Sequence[sp.ShardGroup], **kwargs: Any) -> list[Any]:
    futures = _GROUP_TASKS[fn].map(group=list(groups), **{k: unmapped(v) for k, v in kwargs.items()})
    return [f.result() for f in futures]


def _run_task(fn: Callable[..., Any], **kwargs: Any) -> Any:
    return _REDUCE_TASKS[fn](**kwargs)


@task(name="publish-subspace")
def publish(result: sp.FitResult, top: int = 20) -> None:
    """The explained-variance plot (PNG beside the output, and as image + markdown artifacts) and a table
    of the top components. The image is a data: URI, so it renders without any public URL."""
    png = sp.plot_explained_variance(result.explained_variance_ratio, result.uri)
    data_uri = png_artifact(png, "subspace-explained-variance", f"Explained variance of {redact(result.uri)}")
    total = sum(result.explained_variance_ratio)
    create_markdown_artifact(
        key="subspace-summary",
        markdown=(f"### Subspace `{redact(result.uri)}`\n\n{result.rows} rows, {result.components} components, "
                  f"{total:.2%} of the standardised variance.\n\n![explained variance]({data_uri})\n\n"
                  f"Plot file: `{redact(join(result.uri, sp.PLOT_FILE))}`"),
    )
    cum = 0.0
    rows = []
    for i, (s, r) in enumerate(zip(result.singular_values, result.explained_variance_ratio, strict=True)):
        cum += r
        if i < top:
            rows.append({"component": i, "singular_value": round(s, 4), "ratio": round(r, 6), "cumulative": round(cum, 6)})
    create_table_artifact(rows, key="subspace-top-components", description=f"Top {len(rows)} components")


@flow(name="fit-subspace", flow_run_name=dataset_run_name("fit-subspace"))
def fit_subspace(config: FitSubspaceConfig) -> sp.FitResult:
    """Fit the weights2weights subspace of a dataset (q + 2 passes, each mapped over groups of shards);
    the run is named ``fit-subspace-<dataset>`` and tagged ``dataset:<dataset>``."""
    tag_run(config.dataset)
    if _needs_dask_subflow(config):
        return flow_for(config)(config)
    result = sp.fit_subspace(config.dataset, config.out, config.options, config.work,
                             map_shards=_map_tasks, run=_run_task)
    publish(result)
    return result
