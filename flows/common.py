"""What every flow shares with the Prefect UI: run names and tags, artifact keys, throttled progress, PNG artifacts.

Runs are findable by dataset: every flow that works on a dataset names its run after it and tags it
``dataset:<name>`` (the names themselves: ``flows/names.py``).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.artifacts import create_image_artifact, create_progress_artifact, update_progress_artifact

from weightzoo.flows.names import batch_run_name, dataset_name, dataset_tags
from weightzoo.tasks.progress import report

# An artifact update is one API call, while a training step can take a fraction of a second: a few
# updates a minute suit a human and cost the API nothing.
PROGRESS_EVERY_S = 5.0


def artifact_key(prefix: str, name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"{prefix}-{re.sub(r'[^a-z0-9-]+', '-', name.lower())}".strip("-")


class ThrottledProgress:
    """A ``progress(done, total, *extra)`` callback that updates a progress artifact at most every few seconds,
    and the command's terminal bar (if any) at every call."""

    def __init__(self, key: str, description: str, every_s: float = PROGRESS_EVERY_S) -> None:
        self.artifact_id: UUID = create_progress_artifact(progress=0.0, key=key, description=description)
        self.every_s = every_s
        self._last = 0.0

    def __call__(self, done: int, total: int, *extra: Any) -> None:
        report(done, total, *extra)  # the terminal bar of a run in this process (weightzoo.cli.progress): every call
        now = time.monotonic()
        if done < total and now - self._last < self.every_s:
            return
        self._last = now
        self.set(100.0 * done / max(total, 1))

    def set(self, percent: float) -> None:
        update_progress_artifact(artifact_id=self.artifact_id, progress=percent)


def _config_field(field: str) -> str:
    """``field`` of this flow run's ``config`` parameter (a model in-process, a dict from a deployment)."""
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config") or {}
    return str(config.get(field, "") if isinstance(config, dict) else getattr(config, field, ""))


def dataset_run_name(prefix: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<prefix>-<dataset name>`` from the run's ``config.dataset``."""
    return lambda: f"{prefix}-{dataset_name(_config_field('dataset'))}"


def batch_flow_run_name() -> str:
    """The batch flow's ``flow_run_name``: ``batch_run_name`` of its ``config``."""
    return batch_run_name(_config_field("dataset"), _config_field("batch_id"))


def tag_run(dataset: str) -> None:
    """Add ``dataset_tags`` to this flow run unless it has them (a top-level run is created before its
    parameters are known; a subflow or a submitted batch run already carries them, and costs no call)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx else None
    if run is None or set(dataset_tags(dataset)) <= set(run.tags):
        return
    run.tags = sorted({*run.tags, *dataset_tags(dataset)})
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=run.tags)


def png_artifact(png: bytes, key: str, description: str) -> str:
    """Publish a PNG as an image artifact and return its ``data:`` URI (renders without any public URL)."""
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    create_image_artifact(image_url=data_uri, key=key, description=description)
    return data_uri
