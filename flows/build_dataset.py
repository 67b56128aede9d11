"""``build_dataset``: the parent flow. Validate the manifest, plan what is not committed, fan out, report.

Resume is not a Prefect feature here: the ledger is. A rerun on the same dataset plans only the ids
that are not committed (and, with ``retry_failed``, those whose last attempt failed), so any crash,
of a worker, a child run or this flow, costs at most the batches that were in flight.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from weightzoo.flows.common import artifact_key
from weightzoo.flows.config import BuildRequest
from weightzoo.flows.finetune_batch import finetune_batch
from weightzoo.storage.fs import redact
from weightzoo.storage.ledger import Ledger
from weightzoo.tasks.finetune.batch import BatchPlan, plan_batches
from weightzoo.tasks.finetune.manifest import ManifestError, load_and_validate

MAX_FAILURES_SHOWN = 50


def validate(request: BuildRequest) -> list[str]:
    """Manifest ids, after checking every row and image; bad rows go to the log and an artifact, then raise."""
    try:
        return [r.id for r in load_and_validate(request.manifest)]
    except ManifestError as exc:
        lines = "\n".join(f"| {p.row} | {p.id or ''} | {p.reason} |" for p in exc.problems)
        create_markdown_artifact(
            key="manifest-problems",
            markdown=f"# Manifest rejected\n\n{redact(request.manifest)}\n\n| row | id | problem |\n|---|---|---|\n{lines}",
            description=f"{len(exc.problems)} problem(s); nothing was trained",
        )
        get_run_logger().error("manifest rejected before any training:\n%s", exc)
        raise


def plan(request: BuildRequest, ids: list[str]) -> list[BatchPlan]:
    """Batches of the ids that still need training (manifest − committed, minus failed unless retried)."""
    pending = Ledger(request.dataset).pending(ids, include_failed=request.retry_failed)
    return plan_batches(pending, request.batch_size)


class CommitProgress:
    """The parent's progress artifact: committed / total manifest ids, read from the ledger."""

    def __init__(self, request: BuildRequest, total: int) -> None:
        self.ledger, self.total = Ledger(request.dataset), total
        self.id: UUID = create_progress_artifact(progress=self.percent(), key=artifact_key("build", "progress"),
                                                 description=f"committed of {total} manifest ids")

    def percent(self) -> float:
        return 100.0 * len(self.ledger.committed_ids()) / max(self.total, 1)

    def update(self) -> None:
        update_progress_artifact(artifact_id=self.id, progress=self.percent())


def run_local(request: BuildRequest, batches: list[BatchPlan], progress: CommitProgress) -> dict[str, str]:
    """Each batch as a subflow run in this process, one after another; a failed batch does not stop the rest."""
    states = {}
    for b in batches:
        state = finetune_batch(request.batch(b.batch_id, list(b.ids)), return_state=True)
        states[b.batch_id] = state.type.value
        progress.update()
    return states


def run_on_deployment(request: BuildRequest, batches: list[BatchPlan], progress: CommitProgress) -> dict[str, str]:
    """Submit every batch to the deployment at once (workers pick them up), then wait for all of them."""
    logger = get_run_logger()
    runs: dict[UUID, str] = {}
    for b in batches:
        fr = run_deployment(request.deployment, parameters={"batch": request.batch(b.batch_id, list(b.ids)).model_dump(mode="json")},
                            flow_run_name=f"finetune-{b.batch_id}", timeout=0, as_subflow=True)
        runs[fr.id] = b.batch_id
    logger.info("submitted %d batch runs to %s", len(runs), request.deployment)
    states: dict[str, str] = {}
    deadline = time.monotonic() + request.batch_timeout_s
    with get_client(sync_client=True) as client:
        while runs and time.monotonic() < deadline:
            time.sleep(request.poll_s)
            for run_id, batch_id in list(runs.items()):
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    states[batch_id] = state.type.value
                    del runs[run_id]
                    logger.info("batch %s: %s", batch_id, state.type.value)
                    progress.update()
    for batch_id in runs.values():
        states[batch_id] = "TIMED_OUT"
        logger.warning("batch %s did not finish within %.0f s; its ids stay pending", batch_id, request.batch_timeout_s)
    return states


def summarise(request: BuildRequest, ids: list[str], states: dict[str, str]) -> dict[str, Any]:
    """Counts from the ledger (the truth, whatever the runs reported), plus each batch run's final state."""
    ledger = Ledger(request.dataset)
    committed, wanted = ledger.committed_ids(), set(ids)
    failed = {i: f for i, f in ledger.failed().items() if i in wanted}
    pending = [i for i in ids if i not in committed and i not in failed]
    return {
        "dataset": redact(request.dataset),
        "total": len(ids),
        "committed": sum(1 for i in ids if i in committed),
        "failed": len(failed),
        "pending": len(pending),
        "batches": states,
        "failures": [{"id": f.id, "reason": f.reason, "attempt": f.attempt} for f in failed.values()],
    }


def publish_summary(summary: dict[str, Any]) -> None:
    bad_batches = {b: s for b, s in summary["batches"].items() if s != "COMPLETED"}
    lines = [
        f"# Dataset build: {summary['dataset']}",
        "",
        "| committed | failed | pending | total | batch runs | not completed |",
        "|---|---|---|---|---|---|",
        f"| {summary['committed']} | {summary['failed']} | {summary['pending']} | {summary['total']} "
        f"| {len(summary['batches'])} | {len(bad_batches)} |",
    ]
    if summary["failures"]:
        lines += ["", "## Failed items", "", "| id | attempt | reason |", "|---|---|---|"]
        lines += [f"| {f['id']} | {f['attempt']} | {f['reason']} |" for f in summary["failures"][:MAX_FAILURES_SHOWN]]
    if bad_batches:
        lines += ["", "## Batch runs not completed (their ids stay pending; rerun to resume)", ""]
        lines += [f"- {b}: {s}" for b, s in bad_batches.items()]
    create_markdown_artifact(key="build-summary", markdown="\n".join(lines),
                             description=f"{summary['committed']}/{summary['total']} committed")


@flow(name="build-dataset", flow_run_name="build-{request.batch_size}-per-batch", log_prints=False)
def build_dataset(request: BuildRequest) -> dict[str, Any]:
    """Validate the manifest, train every id not yet committed in batches, and report the ledger's counts."""
    logger = get_run_logger()
    ids = validate(request)
    batches = plan(request, ids)
    logger.info("%d ids, %d to train in %d batches of <= %d (%s executor)", len(ids),
                sum(len(b.ids) for b in batches), len(batches), request.batch_size, request.executor)
    progress = CommitProgress(request, len(ids))
    run = run_local if request.executor == "local" else run_on_deployment
    states = run(request, batches, progress) if batches else {}
    summary = summarise(request, ids, states)
    publish_summary(summary)
    logger.info("%d committed, %d failed, %d pending of %d", summary["committed"], summary["failed"],
                summary["pending"], summary["total"])
    return summary
