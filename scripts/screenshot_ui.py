"""Screenshots of the Prefect UI for docs/: a small build on a real local server, then headless Chromium.

    .venv/bin/python scripts/screenshot_ui.py [--out docs] [--subjects 4] [--only-failed]

Starts ``prefect server start`` on a free loopback port (private PREFECT_HOME), builds a tiny dataset
with the local executor (one image corrupted after validation, so a failure shows in the tables),
and saves the parent run's and one batch run's artifact tabs as PNGs; then a build whose every row
diverges (an absurd learning rate), whose parent run ends Failed with its counts and first reasons
(ui-failed-build.png; ``--only-failed`` makes that one alone). Needs ``chromium`` on PATH
(``apt-get install -y chromium``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from weightzoo.deployments.net import free_port, wait_healthy

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000", "--virtual-time-budget=15000",
]


def start_server(home: Path, port: int) -> subprocess.Popen:
    api = f"http://127.0.0.1:{port}/api"  # the UI's browser code calls this, not the default :4200
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_API_URL": api, "PREFECT_UI_API_URL": api}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"{api}/health", timeout=240, proc=proc)
    except (TimeoutError, RuntimeError):
        proc.terminate()
        raise
    return proc


def screenshot(url: str, out: Path) -> None:
    profile = tempfile.mkdtemp()
    try:
        subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    print(f"wrote {out} ({url})")


def build_demo(work: Path, subjects: int) -> str:
    """Run a small local build against the configured API; returns the parent run's id."""
    from prefect.client.orchestration import get_client

    from weightzoo.flows.build_dataset import build_dataset
    from weightzoo.flows.config import BuildConfig
    from weightzoo.flows.finetune_batch import finetune_batch
    from weightzoo.tasks.identity.base_model import save_tiny_pipeline
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    base = save_tiny_pipeline(work / "base")
    manifest = write_demo_manifest(str(work / "m"), subjects)
    ft = FinetuneConfig(steps=4, num_class_images=1, class_inference_steps=1, pack=2, check_every=1)
    req = BuildConfig(manifest=manifest, base=str(base), dataset=str(work / "ds"), batch_size=2, finetune=ft)
    # One batch meets a corrupt image (as if it broke after validation): its table shows the failure.
    bad = work / "m" / "images" / "subject-00001" / "0.png"
    bad.write_bytes(bad.read_bytes()[:33] + b"not image data")  # header parses, decoding fails
    finetune_batch(req.batch("b-demo", ["subject-00000", "subject-00001"]))
    write_demo_manifest(str(work / "m"), subjects)  # fixed again: the build retries it and trains the rest
    state = build_dataset(req, return_state=True)
    with get_client(sync_client=True) as client:
        return str(client.read_flow_run(state.state_details.flow_run_id).id)


def build_failed(work: Path, subjects: int) -> str:
    """A build none of whose rows commit (every loss diverges): its parent run ends Failed; returns its id."""
    from weightzoo.flows.build_dataset import build_dataset
    from weightzoo.flows.config import BuildConfig
    from weightzoo.tasks.identity.base_model import save_tiny_pipeline
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    base = work / "base" if (work / "base").exists() else save_tiny_pipeline(work / "base")
    manifest = write_demo_manifest(str(work / "m-failed"), subjects)
    ft = FinetuneConfig(steps=4, learning_rate=1e30, num_class_images=1, class_inference_steps=1, pack=2, check_every=1)
    req = BuildConfig(manifest=manifest, base=str(base), dataset=str(work / "ds-failed"), batch_size=2, finetune=ft)
    state = build_dataset(req, return_state=True)
    assert state.is_failed(), state
    print(f"failed build: {state.message}")
    return str(state.state_details.flow_run_id)


def latest_artifact_ids() -> dict[str, str]:
    """Artifact key -> id of its newest version."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key: str(a.latest_id) for a in client.read_latest_artifacts(limit=100)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs", help="Folder for the PNGs (default docs).")
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--only-failed", action="store_true", help="Only the failed build's screenshot.")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wz-ui-"))
    port = free_port()
    server = start_server(work / "prefect-home", port)
    try:
        os.environ.update({"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(work / "client-home"),
                           "HF_HUB_OFFLINE": "1"})
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ui = f"http://127.0.0.1:{port}"
        if not args.only_failed:
            parent = build_demo(work, args.subjects)
            screenshot(f"{ui}/runs/flow-run/{parent}", out / "ui-flow-run.png")  # batch runs + artifacts on the timeline
            latest = latest_artifact_ids()  # an artifact's own page renders its table or markdown
            screenshot(f"{ui}/artifacts/artifact/{latest['build-summary']}", out / "ui-build-summary.png")
            screenshot(f"{ui}/artifacts/artifact/{latest['batch-b-demo']}", out / "ui-batch-table.png")  # the failed item
        failed = build_failed(work, args.subjects)
        screenshot(f"{ui}/runs/flow-run/{failed}", out / "ui-failed-build.png")  # Failed state, its message
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
