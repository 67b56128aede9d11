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
from weightzoo.flows.config import BuildConfig
from weightzoo.flows.finetune_batch import finetune_batch
from weightzoo.storage import card
from weightzoo.storage.card import Recipe
from weightzoo.storage.fs import redact
from weightzoo.storage.lease import Lease
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.retry import describe, with_retries
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.batch import BatchPlan, cached_fingerprint, plan_batches
from weightzoo.tasks.finetune.manifest import load_and_validate
from weightzoo.tasks.finetune.row import ManifestError
from weightzoo.tasks.progress import COMMITTED, report

MAX_FAILURES_SHOWN = 50
LEASED = "LEASED"  # a batch state of our own: another live build holds the batch


def validate(request: BuildConfig) -> list[str]:
    """Manifest ids, after checking every row and image; bad rows go to the log and an artifact, then raise."""
    try:
        return [r.id for r in load_and_validate(request.manifest, rules=engines.get(request.engine).rows)]
    except ManifestError as exc:
        lines = "\n".join(f"| {p.row} | {p.id or ''} | {p.reason} |" for p in exc.problems)
        create_markdown_artifact(
            key="manifest-problems",
            markdown=f"# Manifest rejected\n\n{redact(request.manifest)}\n\n| row | id | problem |\n|---|---|---|\n{lines}",
            description=f"{len(exc.problems)} problem(s); nothing was trained",
        )
        get_run_logger().error("manifest rejected before any training:\n%s", exc)
        raise


def check_recipe(request: BuildConfig) -> None:
    """Refuse, before anything trains, a build whose base model or fine-tune config differs from the
    dataset's card (one dataset, one recipe)."""
    base_fp = cached_fingerprint(request.engine, request.base)
    recipe = Recipe.of(request.engine, base_fp, request.finetune)
    with_retries(lambda: card.check_recipe(Ledger(request.dataset), recipe), "reading the dataset card")


def plan(request: BuildConfig, ids: list[str]) -> list[BatchPlan]:
    """Batches of the ids that still need training (manifest − committed, minus failed unless retried)."""
    ledger = Ledger(request.dataset)
    pending = with_retries(lambda: ledger.pending(ids, include_failed=request.retry_failed), "reading the ledger")
    return plan_batches(pending, request.batch_size)


class CommitProgress:
    """The parent's progress artifact: committed / total manifest ids, read from the ledger."""

    def __init__(self, request: BuildConfig, total: int) -> None:
        self.ledger, self.total = Ledger(request.dataset), total
        self.id: UUID = create_progress_artifact(progress=self.percent(), key=artifact_key("build", "progress"),
                                                 description=f"committed of {total} manifest ids")

    def percent(self) -> float:
        committed = len(with_retries(self.ledger.committed_ids, "reading the ledger"))
        report(committed, self.total, bar=COMMITTED)  # the command's terminal bar, when this runs in its process
        return 100.0 * committed / max(self.total, 1)

    def update(self) -> None:
        try:
            update_progress_artifact(artifact_id=self.id, progress=self.percent())
        except Exception as exc:  # progress is cosmetic: a storage or API blip must not stop the build
            get_run_logger().warning("progress not updated: %s", describe(exc))


def _build_id() -> str | None:
    """This build's flow-run id: its batches' leases name it, so a rerun takes over its own crashed attempt."""
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return str(run_id) if run_id else None


def _run_batch_subflow(request: BuildConfig, b: BatchPlan) -> str:
    """One batch as a subflow run: its final state, or LEASED when another live build is training it."""
    state = finetune_batch(request.batch(b.batch_id, list(b.ids), _build_id()), return_state=True)
    if state.is_completed() and state.result().get("leased"):
        return LEASED
    return state.type.value


def run_local(request: BuildConfig, batches: list[BatchPlan], progress: CommitProgress) -> dict[str, str]:
    """Each batch as a subflow run in this process, one after another; a failed batch does not stop the rest.

    A batch another build holds is passed over, then taken up again once its lease is released or expired
    (usually it is then committed, and its run loads nothing), so two builds share the work.
    """
    states, waiting = {}, []
    for b in batches:
        states[b.batch_id] = _run_batch_subflow(request, b)
        if states[b.batch_id] == LEASED:
            waiting.append(b)
        progress.update()
    ledger, deadline = Ledger(request.dataset), time.monotonic() + request.batch_timeout_s
    while waiting and time.monotonic() < deadline:
        time.sleep(request.poll_s)
        for b in [b for b in waiting if not Lease(ledger, b.batch_id, 0).held_by_other()]:
            states[b.batch_id] = _run_batch_subflow(request, b)
            if states[b.batch_id] != LEASED:
                waiting.remove(b)
            progress.update()
    return states


def run_on_deployment(request: BuildConfig, batches: list[BatchPlan], progress: CommitProgress) -> dict[str, str]:
    """Submit every batch to the deployment at once (workers pick them up) and wait for all of them; then
    re-plan the still-pending ids of runs that crashed or failed, for up to ``request.rounds`` rounds.

    A run is Crashed by the heartbeat automation (deployments/crash-zombie-runs.yaml) when its worker dies,
    so a killed worker costs one batch's time, not a manual rerun. A completed run whose ids are still
    pending found its batch leased by another build: it is waited for and submitted again too.
    """
    logger = get_run_logger()
    states: dict[str, str] = {}
    deadline = time.monotonic() + request.batch_timeout_s
    for round_no in range(1, request.rounds + 1):
        round_states = _submit_and_wait(request, batches, progress, deadline)
        states.update(round_states)
        again = _still_pending(request, batches, round_states)
        states.update({b.batch_id: LEASED for b in again if round_states[b.batch_id] == "COMPLETED"})
        if not again or time.monotonic() >= deadline:
            break
        if round_no == request.rounds:
            logger.warning("%d batch(es) still pending after %d round(s); rerun to resume", len(again), round_no)
            break
        batches = _replan(request, again, states)
        logger.info("round %d: re-planned %d pending ids of %d crashed, failed or leased batch(es) into %d batch(es)",
                    round_no + 1, sum(len(b.ids) for b in batches), len(again), len(batches))
        _wait_for_leases(request, batches, deadline)
    return states


def _submit_and_wait(request: BuildConfig, batches: list[BatchPlan], progress: CommitProgress,
                     deadline: float) -> dict[str, str]:
    """One round: submit every batch as a deployment run, poll until each is final or ``deadline`` passes."""
    logger = get_run_logger()
    runs: dict[UUID, str] = {}
    for b in batches:
        fr = run_deployment(request.deployment, parameters={"batch": request.batch(b.batch_id, list(b.ids), _build_id()).model_dump(mode="json")},
                            flow_run_name=f"finetune-{b.batch_id}", timeout=0, as_subflow=True)
        runs[fr.id] = b.batch_id
    logger.info("submitted %d batch runs to %s", len(runs), request.deployment)
    states: dict[str, str] = {}
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


# Final states worth another round when ids are still pending: the run died (Crashed) or raised (Failed),
# or completed without training (its batch was leased by another build). Cancelled is a person's decision;
# a timed-out run may still be training.
REPLAN_STATES = {"CRASHED", "FAILED", "COMPLETED"}


def _still_pending(request: BuildConfig, batches: list[BatchPlan], states: dict[str, str]) -> list[BatchPlan]:
    """Batches of this round whose run crashed, failed, or completed without committing (leased elsewhere),
    reduced to their ids that are neither committed nor recorded as failed items (those wait for a rerun)."""
    ledger = Ledger(request.dataset)
    pending = set(with_retries(lambda: ledger.pending([i for b in batches for i in b.ids], include_failed=False),
                               "reading the ledger"))
    out = []
    for b in batches:
        ids = tuple(i for i in b.ids if i in pending)
        if states.get(b.batch_id) in REPLAN_STATES and ids:
            out.append(BatchPlan(b.batch_id, ids))
    return out


def _replan(request: BuildConfig, batches: list[BatchPlan], states: dict[str, str]) -> list[BatchPlan]:
    """Each batch's pending ids as batches again: the same batch id when none of its ids was committed
    meanwhile; a batch whose ids moved to a new batch id leaves the states (its ids are reported there)."""
    out = []
    for b in batches:
        new = plan_batches(list(b.ids), request.batch_size)
        if [n.batch_id for n in new] != [b.batch_id]:
            states.pop(b.batch_id, None)
        out += new
    return out


def _wait_for_leases(request: BuildConfig, batches: list[BatchPlan], deadline: float) -> None:
    """Hold the next round until no other holder's lease covers its batches (a killed worker's lease expires
    within the lease TTL), so a re-submitted run trains instead of finding its batch leased."""
    ledger = Ledger(request.dataset)
    while time.monotonic() < deadline and any(Lease(ledger, b.batch_id, 0).held_by_other() for b in batches):
        time.sleep(request.poll_s)


def summarise(request: BuildConfig, ids: list[str], states: dict[str, str]) -> dict[str, Any]:
    """Counts from the ledger (the truth, whatever the runs reported), plus each batch run's final state."""
    ledger = Ledger(request.dataset)
    committed = with_retries(ledger.committed_ids, "reading the ledger")
    wanted = set(ids)
    failed = {i: f for i, f in with_retries(ledger.failed, "reading the ledger").items() if i in wanted}
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
def build_dataset(request: BuildConfig) -> dict[str, Any]:
    """Validate the manifest, train every id not yet committed in batches, and report the ledger's counts."""
    logger = get_run_logger()
    ids = validate(request)
    check_recipe(request)
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
