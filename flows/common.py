"""What every flow shares with the Prefect UI: run names, artifact keys, throttled progress, PNG artifacts."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect.artifacts import create_image_artifact, create_progress_artifact, update_progress_artifact

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


def run_name(prefix: str, param: str, field: str = "out") -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<prefix>-<last path part of params[param].field>``."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters.get(param) or {}
        value = params.get(field, "") if isinstance(params, dict) else getattr(params, field, "")
        return f"{prefix}-{str(value).rstrip('/').rsplit('/', 1)[-1]}"

    return name


def png_artifact(png: bytes, key: str, description: str) -> str:
    """Publish a PNG as an image artifact and return its ``data:`` URI (renders without any public URL)."""
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    create_image_artifact(image_url=data_uri, key=key, description=description)
    return data_uri
