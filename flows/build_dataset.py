"""``build_dataset``: the parent flow. Check the inputs, validate the manifest, record the config, plan what
is not committed, fan out, report.

Its first steps (``build_checks.py``) are the same whoever starts it, the CLI, ``weightzoo.build`` or the
build-dataset deployment: paths, base and manifest are checked, then every row, and only then is
``<dataset>/_builds/<time>.json`` written; a refusal ends the run Failed within seconds, its one-line
reason as the state message.

Resume is not a Prefect feature here: the ledger is. A rerun on the same dataset plans only the ids
that are not committed (and, with ``retry_failed``, those whose last attempt failed), so any crash,
of a worker, a child run or this flow, costs at most the batches that were in flight.

The flow opens the dataset's ledger once and hands it to each step. It ends Failed (``BuildIncomplete``,
whose message gives the counts and the first reasons) unless every manifest id is committed: a build is
done when its rows are, whatever its batch runs reported. Why the deployment executor polls its runs
itself instead of leaning on a Prefect primitive: docs/ORCHESTRATION.md.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from weightzoo.flows.build_checks import check_build, record_config
from weightzoo.flows.common import artifact_key, dataset_run_name, tag_run
from weightzoo.flows.config import BuildConfig
from weightzoo.flows.finetune_batch import finetune_batch
from weightzoo.flows.names import batch_run_name, dataset_tags
from weightzoo.storage import card
from weightzoo.storage.card import Recipe
from weightzoo.storage.fs import redact
from weightzoo.storage.health import probe
from weightzoo.storage.lease import Lease
from weightzoo.storage.ledger import Ledger
from weightzoo.storage.retry import describe, with_retries
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.batch import BatchPlan, cached_fingerprint, plan_batches
from weightzoo.tasks.finetune.manifest import load_and_validate
from weightzoo.tasks.finetune.row import ManifestError
from weightzoo.tasks.progress import COMMITTED, report

MAX_FAILURES_SHOWN = 50
REASONS_IN_MESSAGE = 3  # the state message is one line in the UI's run list: the first few reasons, then counts
LEASED = "LEASED"  # a batch state of our own: another live build holds the batch
RUN_EXCEPTION = "Flow run encountered an exception: "  # how Prefect opens a failed run's message


class BuildIncomplete(RuntimeError):
    """Raised by ``build_dataset`` when some manifest ids are not committed: the run ends Failed with the
    counts and the first reasons as its message; ``summary`` is the same dict a complete build returns."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        super().__init__(failure_message(summary))

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:  # Prefect pickles a failed run's exception
        return (type(self), (self.summary,))


def failure_message(summary: dict[str, Any]) -> str:
    """One line: how many ids are not committed, then the first batch-run and item reasons."""
    missing = summary["total"] - summary["committed"]
    reasons = [f"batch {b['batch']} {b['state']}: {b['reason']}" for b in summary["batch_failures"]]
    reasons += [f"{f['id']}: {f['reason']}" for f in summary["failures"]]
    shown = "; ".join(reasons[:REASONS_IN_MESSAGE]) + ("; ..." if len(reasons) > REASONS_IN_MESSAGE else "")
    return (f"{missing} of {summary['total']} ids not committed ({summary['failed']} failed, {summary['pending']} "
            f"pending; {len(summary['batch_failures'])} of {len(summary['batches'])} batch runs not completed)"
            + (f": {shown}" if shown else ""))


@dataclass
class BatchRuns:
    """Each batch run's final state, and the reason given by those that did not complete."""

    states: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def record(self, batch_id: str, state: str, reason: str | None = None) -> None:
        self.states[batch_id] = state
        if state == "COMPLETED":
            self.reasons.pop(batch_id, None)
        else:  # "Flow run encountered an exception: OSError: ..." -> "OSError: ..."
            self.reasons[batch_id] = (reason or state.lower()).removeprefix(RUN_EXCEPTION).strip()

    def forget(self, batch_id: str) -> None:
        self.states.pop(batch_id, None)
        self.reasons.pop(batch_id, None)


def validate(config: BuildConfig) -> list[str]:
    """Manifest ids, after checking every row and image; bad rows go to an artifact, then raise."""
    try:
        return [r.id for r in load_and_validate(config.manifest, rules=engines.get(config.engine).rows)]
    except ManifestError as exc:
        lines = "\n".join(f"| {p.row} | {p.id or ''} | {p.reason} |" for p in exc.problems)
        create_markdown_artifact(
            key="manifest-problems",
            markdown=f"# Manifest rejected\n\n{redact(config.manifest)}\n\n| row | id | problem |\n|---|---|---|\n{lines}",
            description=f"{len(exc.problems)} problem(s); nothing was trained",
        )
        raise  # the run fails with the problems as its message: the CLI prints them in one line, the UI in the state


def check_recipe(config: BuildConfig, ledger: Ledger) -> None:
    """Refuse, before anything trains, a build whose base model or fine-tune config differs from the
    dataset's card (one dataset, one recipe)."""
    base_fp = cached_fingerprint(config.engine, config.base)
    recipe = Recipe.of(config.engine, base_fp, config.finetune)
    with_retries(lambda: card.check_recipe(ledger, recipe), "reading the dataset card")


def plan(config: BuildConfig, ledger: Ledger, ids: list[str]) -> list[BatchPlan]:
    """Batches of the ids that still need training (manifest − committed, minus failed unless retried)."""
    pending = with_retries(lambda: ledger.pending(ids, include_failed=config.retry_failed), "reading the ledger")
    return plan_batches(pending, config.batch_size)


class CommitProgress:
    """The parent's progress artifact: committed / total manifest ids, read from the ledger."""

    def __init__(self, ledger: Ledger, total: int) -> None:
        self.ledger, self.total = ledger, total
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


def _run_batch_subflow(config: BuildConfig, b: BatchPlan, runs: BatchRuns) -> str:
    """One batch as a subflow run: records its final state (LEASED when another live build is training it)."""
    with tags(*dataset_tags(config.dataset)):  # the run is made with them: filterable while it trains
        state = finetune_batch(config.batch(b.batch_id, list(b.ids), _build_id()), return_state=True)
    if state.is_completed() and state.result().get("leased"):
        runs.record(b.batch_id, LEASED, "leased by another build until the wait ended")
    else:
        runs.record(b.batch_id, state.type.value, state.message)
    return runs.states[b.batch_id]


def run_local(config: BuildConfig, ledger: Ledger, batches: list[BatchPlan], progress: CommitProgress) -> BatchRuns:
    """Each batch as a subflow run in this process, one after another; a failed batch does not stop the rest.

    A batch another build holds is passed over, then taken up again once its lease is released or expired
    (usually it is then committed, and its run loads nothing), so two builds share the work.
    """
    runs, waiting = BatchRuns(), []
    for b in batches:
        if _run_batch_subflow(config, b, runs) == LEASED:
            waiting.append(b)
        progress.update()
    deadline = time.monotonic() + config.batch_timeout_s
    while waiting and time.monotonic() < deadline:
        time.sleep(config.poll_s)
        for b in [b for b in waiting if not Lease(ledger, b.batch_id, 0).held_by_other()]:
            if _run_batch_subflow(config, b, runs) != LEASED:
                waiting.remove(b)
            progress.update()
    return runs


def run_on_deployment(config: BuildConfig, ledger: Ledger, batches: list[BatchPlan],
                      progress: CommitProgress) -> BatchRuns:
    """Submit every batch to the deployment at once (workers pick them up) and wait for all of them; then
    re-plan the still-pending ids of runs that crashed or failed, for up to ``config.rounds`` rounds.

    A run is Crashed by the heartbeat automation (deployments/crash-zombie-runs.yaml) when its worker dies,
    so a killed worker costs one batch's time, not a manual rerun. A completed run whose ids are still
    pending found its batch leased by another build: it is waited for and submitted again too.
    """
    logger = get_run_logger()
    runs = BatchRuns()
    deadline = time.monotonic() + config.batch_timeout_s
    for round_no in range(1, config.rounds + 1):
        round_runs = _submit_and_wait(config, batches, progress, deadline)
        runs.states.update(round_runs.states)
        runs.reasons.update(round_runs.reasons)
        again = _still_pending(ledger, batches, round_runs.states)
        for b in again:
            if round_runs.states[b.batch_id] == "COMPLETED":
                runs.record(b.batch_id, LEASED, "leased by another build")
        if not again or time.monotonic() >= deadline:
            break
        if round_no == config.rounds:
            logger.warning("%d batch(es) still pending after %d round(s); rerun to resume", len(again), round_no)
            break
        batches = _replan(config, again, runs)
        logger.info("round %d: re-planned %d pending ids of %d crashed, failed or leased batch(es) into %d batch(es)",
                    round_no + 1, sum(len(b.ids) for b in batches), len(again), len(batches))
        _wait_for_leases(config, ledger, batches, deadline)
    return runs


def _submit_and_wait(config: BuildConfig, batches: list[BatchPlan], progress: CommitProgress,
                     deadline: float) -> BatchRuns:
    """One round: submit every batch as a deployment run, poll until each is final or ``deadline`` passes."""
    logger = get_run_logger()
    submitted: dict[UUID, str] = {}
    runs = BatchRuns()
    try:
        for b in batches:
            fr = run_deployment(config.deployment,
                                parameters={"config": config.batch(b.batch_id, list(b.ids), _build_id()).model_dump(mode="json")},
                                flow_run_name=batch_run_name(config.dataset, b.batch_id),
                                tags=dataset_tags(config.dataset), timeout=0, as_subflow=True)
            submitted[fr.id] = b.batch_id
        logger.info("submitted %d batch runs to %s", len(submitted), config.deployment)
        with get_client(sync_client=True) as client:
            while submitted and time.monotonic() < deadline:
                time.sleep(config.poll_s)
                for run_id, batch_id in list(submitted.items()):
                    state = client.read_flow_run(run_id).state
                    if state is not None and state.is_final():
                        runs.record(batch_id, state.type.value, state.message)
                        del submitted[run_id]
                        logger.info("batch %s: %s", batch_id, state.type.value)
                        progress.update()
    except BaseException as e:
        if not isinstance(e, Exception):  # Ctrl-C or SIGTERM (not an error: the API itself may be failing)
            cancelled = cancel_queued(list(submitted))
            if cancelled:
                logger.warning("build stopped: cancelled its %d batch run(s) no worker had started", cancelled)
        raise
    for batch_id in submitted.values():
        runs.record(batch_id, "TIMED_OUT", f"did not finish within {config.batch_timeout_s:.0f} s")
        logger.warning("batch %s did not finish within %.0f s; its ids stay pending", batch_id, config.batch_timeout_s)
    return runs


def cancel_queued(run_ids: list[UUID]) -> int:
    """Cancel those of ``run_ids`` still Scheduled, and return how many. A stopped build's queued runs would
    otherwise start later, on a worker the user thought idle, racing the next build for the same batches
    (leases keep rows single, not time); runs already training finish and commit their batch."""
    from prefect.states import Cancelled

    done = 0
    with contextlib.suppress(Exception), get_client(sync_client=True) as client:  # the API may be gone too
        for run_id in run_ids:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_scheduled():
                client.set_flow_run_state(run_id, Cancelled(message="the build that submitted it was stopped"))
                done += 1
    return done


# Final states worth another round when ids are still pending: the run died (Crashed) or raised (Failed),
# or completed without training (its batch was leased by another build). Cancelled is a person's decision;
# a timed-out run may still be training.
REPLAN_STATES = {"CRASHED", "FAILED", "COMPLETED"}


def _still_pending(ledger: Ledger, batches: list[BatchPlan], states: dict[str, str]) -> list[BatchPlan]:
    """Batches of this round whose run crashed, failed, or completed without committing (leased elsewhere),
    reduced to their ids that are neither committed nor recorded as failed items (those wait for a rerun)."""
    pending = set(with_retries(lambda: ledger.pending([i for b in batches for i in b.ids], include_failed=False),
                               "reading the ledger"))
    out = []
    for b in batches:
        ids = tuple(i for i in b.ids if i in pending)
        if states.get(b.batch_id) in REPLAN_STATES and ids:
            out.append(BatchPlan(b.batch_id, ids))
    return out


def _replan(config: BuildConfig, batches: list[BatchPlan], runs: BatchRuns) -> list[BatchPlan]:
    """Each batch's pending ids as batches again: the same batch id when none of its ids was committed
    meanwhile; a batch whose ids moved to a new batch id leaves the runs (its ids are reported there)."""
    out = []
    for b in batches:
        new = plan_batches(list(b.ids), config.batch_size)
        if [n.batch_id for n in new] != [b.batch_id]:
            runs.forget(b.batch_id)
        out += new
    return out


def _wait_for_leases(config: BuildConfig, ledger: Ledger, batches: list[BatchPlan], deadline: float) -> None:
    """Hold the next round until no other holder's lease covers its batches (a killed worker's lease expires
    within the lease TTL), so a re-submitted run trains instead of finding its batch leased."""
    while time.monotonic() < deadline and any(Lease(ledger, b.batch_id, 0).held_by_other() for b in batches):
        time.sleep(config.poll_s)


def summarise(config: BuildConfig, ledger: Ledger, ids: list[str], runs: BatchRuns) -> dict[str, Any]:
    """Counts from the ledger (the truth, whatever the runs reported), plus each batch run's final state
    and, for those that did not complete, the reason their run gave."""
    commits = with_retries(ledger.commits, "reading the ledger")
    committed = {i for c in commits for i in c.ids}
    wanted = set(ids)
    failed = {i: f for i, f in with_retries(ledger.failed, "reading the ledger").items() if i in wanted}
    pending = [i for i in ids if i not in committed and i not in failed]
    return {
        "dataset": redact(config.dataset),
        "total": len(ids),
        "committed": sum(1 for i in ids if i in committed),
        "failed": len(failed),
        "pending": len(pending),
        "shards": len(commits),
        "batches": runs.states,
        "batch_failures": [{"batch": b, "state": runs.states[b], "reason": r} for b, r in runs.reasons.items()],
        "failures": [{"id": f.id, "reason": f.reason, "attempt": f.attempt} for f in failed.values()],
    }


def publish_summary(summary: dict[str, Any]) -> None:
    """The build-summary artifact: the counts, each failed item and each batch run that did not complete,
    with their reasons."""
    lines = [
        f"# Dataset build: {summary['dataset']}",
        "",
        "| committed | failed | pending | total | batch runs | not completed |",
        "|---|---|---|---|---|---|",
        f"| {summary['committed']} | {summary['failed']} | {summary['pending']} | {summary['total']} "
        f"| {len(summary['batches'])} | {len(summary['batch_failures'])} |",
    ]
    if summary["failures"]:
        lines += ["", "## Failed items", "", "| id | attempt | reason |", "|---|---|---|"]
        lines += [f"| {f['id']} | {f['attempt']} | {f['reason']} |" for f in summary["failures"][:MAX_FAILURES_SHOWN]]
    if summary["batch_failures"]:
        lines += ["", "## Batch runs not completed (their ids stay pending; rerun to resume)", "",
                  "| batch | state | reason |", "|---|---|---|"]
        lines += [f"| {b['batch']} | {b['state']} | {b['reason']} |" for b in summary["batch_failures"]]
    create_markdown_artifact(key="build-summary", markdown="\n".join(lines),
                             description=f"{summary['committed']}/{summary['total']} committed")


@flow(name="build-dataset", flow_run_name=dataset_run_name("build"), log_prints=False)
def build_dataset(config: BuildConfig) -> dict[str, Any]:
    """Check the inputs and every manifest row, record the config, train every id not yet committed in
    batches, report the ledger's counts; Failed (``BuildIncomplete``) unless every id is committed."""
    logger = get_run_logger()
    tag_run(config.dataset)  # first: a build refused by its checks is found by its dataset too
    check_build(config)  # paths, engine, base (index files), manifest parses: one line, nothing loaded or made
    ids = validate(config)
    probe(config.dataset)  # an unreachable store, refused credentials, no bucket: one line, before any batch
    ledger = Ledger(config.dataset)
    check_recipe(config, ledger)
    logger.info("config recorded at %s", redact(record_config(config)))  # only once everything above passed
    batches = plan(config, ledger, ids)
    logger.info("%d ids, %d to train in %d batches of <= %d (%s executor)", len(ids),
                sum(len(b.ids) for b in batches), len(batches), config.batch_size, config.executor)
    progress = CommitProgress(ledger, len(ids))
    run = run_local if config.executor == "local" else run_on_deployment
    runs = run(config, ledger, batches, progress) if batches else BatchRuns()
    summary = summarise(config, ledger, ids, runs)
    publish_summary(summary)
    logger.info("%d committed, %d failed, %d pending of %d", summary["committed"], summary["failed"],
                summary["pending"], summary["total"])
    if summary["committed"] < summary["total"]:
        raise BuildIncomplete(summary)
    return summary
