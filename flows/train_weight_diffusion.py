"""Prefect flow ``train-weight-diffusion``: train (or resume) the weight denoiser, then publish its curve.

One task does the training (a single GPU job; its inputs are read from the dataset, not passed through
Prefect), reporting a progress artifact as it goes; a second publishes the loss curve and the model
folder's URI. The algorithm is ``weightzoo.tasks.diffusion.generator``; the parameter model is its
``WeightDiffusionConfig`` (frozen, saved in the model folder as ``config.json``).
"""

from __future__ import annotations

import base64
import time

from prefect import flow, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from weightzoo.storage.fs import filesystem, join, redact
from weightzoo.tasks.diffusion import generator as wd

PROGRESS_EVERY_S = 5.0  # an artifact update is an API call: a few per minute is plenty for a human


# A retry resumes from the last checkpoint (the model folder is the resume mechanism, not Prefect's cache).
@task(name="train-weight-diffusion", task_run_name="train-{config.steps}-steps", retries=1)
def train(config: wd.WeightDiffusionConfig) -> wd.TrainResult:
    """Run ``train_weight_diffusion`` with a progress artifact (percent of steps, updated every few seconds)."""
    artifact = create_progress_artifact(0.0, key="weight-diffusion-progress",
                                        description=f"Training {redact(config.out)}")
    last = [0.0]

    def progress(step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or step == total:
            last[0] = now
            update_progress_artifact(artifact, 100.0 * step / total)

    return wd.train_weight_diffusion(config, progress)


@task(name="publish-weight-diffusion")
def publish(result: wd.TrainResult) -> str:
    """The loss curve as an image artifact (a data: URI, no public URL needed) and the checkpoint URI."""
    fs, root = filesystem(result.uri)
    png = fs.cat_file(join(root, "loss.png"))
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    create_image_artifact(image_url=data_uri, key="weight-diffusion-loss", description=f"Loss of {redact(result.uri)}")
    latest = wd.latest_checkpoint(result.uri) or {}
    checkpoint = join(result.uri, "checkpoints", latest.get("file", "?"))
    create_markdown_artifact(
        key="weight-diffusion-summary",
        markdown=(f"### Weight diffusion `{redact(result.uri)}`\n\nstep {result.step} (resumed from "
                  f"{result.resumed_from}), loss {result.loss:.4g}; {result.train_ids} rows trained on, "
                  f"{result.holdout_ids} held out.\n\nCheckpoint: `{redact(checkpoint)}`\n\n![loss]({data_uri})"),
    )
    return checkpoint


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("config") or {}
    out = params.get("out", "") if isinstance(params, dict) else getattr(params, "out", "")
    return f"train-weight-diffusion-{out.rstrip('/').rsplit('/', 1)[-1]}"


@flow(name="train-weight-diffusion", flow_run_name=_run_name)
def train_weight_diffusion_flow(config: wd.WeightDiffusionConfig) -> wd.TrainResult:
    """Train the text-conditioned weight denoiser on a dataset (minus held-out ids) and publish it."""
    result = train(config)
    publish(result)
    return result
