"""A batch run lost to an API error is re-planned by the build's default rounds (issue #22, item 6).

A real loopback ``prefect server`` and process worker; the deployment's first run of each batch fails on a
real API error (tests/flaky_api_worker.py). With the default ``rounds`` (2) the build plans those ids again
and commits every row once, with no manual rerun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TINY_FINETUNE, deployment_runs, worker_env

pytestmark = pytest.mark.slow

POOL = "wz-rounds"
WAIT_S = 900


@pytest.fixture(scope="module")
def flaky_deployment(prefect_server: str) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from weightzoo.deployments.deploy import deploy_finetune_batch

    sys.path.insert(0, str(Path(__file__).parent))
    from flaky_api_worker import ENTRYPOINT, FLOW_NAME

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        env = worker_env(prefect_server, Path(os.environ["PREFECT_HOME"]))
        subprocess.run([str(Path(sys.executable).with_name("prefect")), "work-pool", "create", POOL, "--type", "process"],
                       env=env, check=True, capture_output=True, timeout=120)
        deploy_finetune_batch(POOL, name="rounds", entrypoint=ENTRYPOINT)
        yield f"{FLOW_NAME}/rounds"


def test_batch_runs_lost_to_an_api_error_are_replanned_by_the_default_rounds(
    flaky_deployment: str, process_worker, tmp_path: Path, tiny_base: Path
) -> None:
    from weightzoo.flows.build_dataset import build_dataset
    from weightzoo.flows.config import BuildConfig
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    process_worker(POOL, limit=2)
    n = 4
    manifest = write_demo_manifest(str(tmp_path / "m"), n)
    dataset = tmp_path / "ds"
    config = BuildConfig(manifest=manifest, base=str(tiny_base), dataset=str(dataset), batch_size=2,
                         executor="deployment", deployment=flaky_deployment, finetune=FinetuneConfig(**TINY_FINETUNE),
                         poll_s=2, batch_timeout_s=WAIT_S)
    assert config.rounds == 2  # the default does the re-planning; nothing is set for it here
    summary = build_dataset(config)
    assert (summary["committed"], summary["failed"], summary["pending"]) == (n, 0, 0)
    runs = deployment_runs(flaky_deployment)
    failed = [r for r in runs if r.state.is_failed()]
    messages = [r.state.message or "" for r in failed]
    assert len(failed) == 2 and all("ObjectNotFound" in m for m in messages), messages
    assert sum(r.state.is_completed() for r in runs) == 2  # each batch: one lost run, one that committed
    assert sorted(p.name for p in tmp_path.glob("api-error-*")) == sorted(f"api-error-{b}" for b in summary["batches"])
    ds = Dataset(str(dataset))
    assert len(ds) == n and sorted(ds.ids) == sorted(f"subject-{k:05d}" for k in range(n))
    raw = [i for f in sorted((dataset / "ledger" / "commits").glob("*.json")) for i in json.loads(f.read_text())["ids"]]
    assert len(raw) == len(set(raw)) == n  # every id committed exactly once
