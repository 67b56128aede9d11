"""The real ``finetune_batch`` flow with the null engine registered: what ``bench/orchestration.py
--executor deployment`` deploys, so each worker's flow-run process knows the engine too.

Registered at import, because Prefect validates the run's parameters (``BatchConfig.engine`` must name a
registered engine) before the flow function starts. Deployed as ``finetune-batch-null/<name>`` from this
checkout, entrypoint ``bench/null_worker.py:finetune_batch_null``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow

sys.path.insert(0, str(Path(__file__).resolve().parent))  # null_engine beside this file, however it is loaded
from null_engine import register_null_engine  # noqa: E402

from weightzoo.flows.config import BatchConfig  # noqa: E402
from weightzoo.flows.finetune_batch import finetune_batch  # noqa: E402

ENTRYPOINT = "bench/null_worker.py:finetune_batch_null"
FLOW_NAME = "finetune-batch-null"

register_null_engine()


@flow(name=FLOW_NAME, flow_run_name="finetune-{config.batch_id}", log_prints=False)
def finetune_batch_null(config: BatchConfig) -> dict[str, Any]:
    """The real finetune-batch flow body (tasks, artifacts, ledger commit) with the null engine."""
    return finetune_batch.fn(config)
