"""The real ``finetune_batch`` flow behind a first attempt that dies on a real Prefect API error.

Deployed by tests/test_rounds_e2e.py (entrypoint ``tests/flaky_api_worker.py:finetune_batch_flaky``): the
first run of each batch asks the server for a flow run that does not exist (the API answers 404, the client
raises ``ObjectNotFound``) and lets the error end the run, as a run that lost its API would; a marker file
beside the dataset makes every later run of that batch the plain flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

from prefect import flow
from prefect.client.orchestration import get_client

from weightzoo.flows.config import BatchConfig
from weightzoo.flows.finetune_batch import finetune_batch

ENTRYPOINT = "tests/flaky_api_worker.py:finetune_batch_flaky"
FLOW_NAME = "finetune-batch-flaky"


@flow(name=FLOW_NAME, flow_run_name="finetune-{config.batch_id}", log_prints=False)
def finetune_batch_flaky(config: BatchConfig) -> dict[str, Any]:
    """First attempt of a batch: a real API error; later ones: the real finetune-batch flow."""
    marker = Path(config.dataset).parent / f"api-error-{config.batch_id}"
    if not marker.exists():
        marker.touch()
        with get_client(sync_client=True) as client:
            client.read_flow_run(uuid4())  # raises prefect.exceptions.ObjectNotFound (HTTP 404)
    return finetune_batch.fn(config)
