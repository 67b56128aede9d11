"""``finetune_batch``: the child flow, one run per batch, on a GPU worker or in-process.

It only wires ``weightzoo.tasks.finetune.batch.run_batch`` (skip committed ids, load the base once, train,
write one shard, commit, record failures) to Prefect: retries for transient errors only, a progress
artifact fed by the engine, a table artifact of the batch's items and an image artifact of their loss
curves; with ``report_to='tensorboard'``, each row's curves as TensorBoard events too
(``tasks/finetune/tracking.py``). The run is named ``finetune-<dataset>-<hash>-<batch>`` and tagged
``dataset:<dataset>`` (``flows/names.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from weightzoo.flows.common import ThrottledProgress, artifact_key, batch_flow_run_name, png_artifact, tag_run
from weightzoo.flows.config import BatchConfig
from weightzoo.storage.fs import redact
from weightzoo.storage.retry import describe, is_transient
from weightzoo.tasks.finetune.batch import BatchOutcome, run_batch
from weightzoo.tasks.finetune.tracking import TensorBoardTracker, check_report_to, plot_curves


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)  # storage blips, timeouts, CUDA runtime; never bad input, no space, read-only
    return False


@task(
    name="train-commit-batch",
    task_run_name="train-commit-{config.batch_id}",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=_retry_condition,
    cache_policy=NO_CACHE,  # the ledger is the resume mechanism, never Prefect's cache
)
def train_and_commit(config: BatchConfig, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Run one batch (a rerun skips what is committed, so a retry never duplicates rows)."""
    tracker = TensorBoardTracker(config.tensorboard_dir()) if config.report_to == "tensorboard" else None
    outcome = run_batch(config.batch_id, config.ids, config.manifest, config.base, config.dataset, config.finetune,
                        engine=config.engine, cache_dir=config.cache_dir, progress=progress, owner=config.build_id,
                        lease_ttl_s=config.lease_ttl_s, tracker=tracker)
    return outcome.to_dict()


def publish_items(outcome: BatchOutcome | dict[str, Any]) -> None:
    """A table artifact of the batch's items: id, status, loss, seconds, reason."""
    d = outcome.to_dict() if isinstance(outcome, BatchOutcome) else outcome
    rows = [
        {"id": i["id"], "status": i["status"], "loss": None if i["loss"] is None else round(i["loss"], 5),
         "seconds": None if i["seconds"] is None else round(i["seconds"], 2), "reason": i["reason"] or ""}
        for i in d["items"]
    ]
    n_ok, n_bad = len(d["committed"]), len(d["failed"])
    create_table_artifact(table=rows, key=artifact_key("batch", d["batch_id"]),
                          description=f"{d['batch_id']}: {n_ok} committed, {n_bad} failed, {len(d['skipped'])} already committed")


def publish_curves(outcome: dict[str, Any], config: BatchConfig) -> None:
    """An image artifact of the batch's rows' stored loss curves (a PNG in a ``data:`` URI: the UI shows
    it with no file server), when any row trained; the rows' PNG is not kept anywhere else."""
    curves = {i["id"]: i["loss_history"] for i in outcome["items"] if i["loss_history"]}
    if not curves:
        return
    window = int(getattr(config.finetune, "loss_window", 1))
    try:
        png = plot_curves(curves, window, f"{config.batch_id} of {redact(config.dataset)}")
        png_artifact(png, artifact_key("loss-curves", config.batch_id),
                     f"{config.batch_id}: loss of {len(curves)} rows, one mean per {window} steps")
    except Exception as exc:  # a picture must not fail a batch whose rows are committed
        get_run_logger().warning("loss curves of %s not published: %s", config.batch_id, describe(exc))


@flow(name="finetune-batch", flow_run_name=batch_flow_run_name, log_prints=False)
def finetune_batch(config: BatchConfig) -> dict[str, Any]:
    """Fine-tune one batch into one committed shard; failed items are recorded, not raised.

    Idempotent: a batch whose ids are all committed returns at once without loading the base.
    """
    logger = get_run_logger()
    tag_run(config.dataset)
    check_report_to(config.report_to)  # a worker without the tracker's package refuses before training
    logger.info("batch %s: %d ids -> %s", config.batch_id, len(config.ids), redact(config.dataset))
    progress = ThrottledProgress(artifact_key("progress", config.batch_id), f"row-steps trained in {config.batch_id}")
    outcome = train_and_commit(config, progress)
    progress.set(100.0)
    publish_items(outcome)
    publish_curves(outcome, config)
    logger.info("batch %s: %d committed, %d failed, %d already committed", config.batch_id,
                len(outcome["committed"]), len(outcome["failed"]), len(outcome["skipped"]))
    for item_id, reason in outcome["failed"]:
        logger.warning("item %s failed: %s", item_id, reason)
    return outcome
