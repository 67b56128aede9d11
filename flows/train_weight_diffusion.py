"""Prefect flow ``train-weight-diffusion``: train (or resume) the weight denoiser, then publish its curve.

One task does the training (a single GPU job; its inputs are read from the dataset, not passed through
Prefect), reporting a progress artifact as it goes; a second publishes the loss curve and the model
folder's URI. The algorithm is ``weightzoo.tasks.diffusion.generator``; the parameter model is its
``WeightDiffusionConfig`` (frozen, saved in the model folder as ``config.json``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from weightzoo.flows.common import ThrottledProgress, dataset_run_name, png_artifact, tag_run
from weightzoo.storage.fs import filesystem, join, redact
from weightzoo.tasks.diffusion import generator as wd


# A retry resumes from the last checkpoint (the model folder is the resume mechanism, not Prefect's cache).
@task(name="train-weight-diffusion", task_run_name="train-{config.steps}-steps", retries=1)
def train(config: wd.WeightDiffusionConfig) -> wd.TrainResult:
    """Run ``train_weight_diffusion`` with a progress artifact (percent of steps, updated every few seconds)."""
    progress = ThrottledProgress("weight-diffusion-progress", f"Training {redact(config.out)}")
    return wd.train_weight_diffusion(config, progress)


@task(name="publish-weight-diffusion")
def publish(result: wd.TrainResult) -> str:
    """The loss curve as an image artifact (a data: URI, no public URL needed) and the checkpoint URI."""
    fs, root = filesystem(result.uri)
    png = fs.cat_file(join(root, "loss.png"))
    data_uri = png_artifact(png, "weight-diffusion-loss", f"Loss of {redact(result.uri)}")
    latest = wd.latest_checkpoint(result.uri) or {}
    checkpoint = join(result.uri, "checkpoints", latest.get("file", "?"))
    warning = wd.condition_warning(result.uri)
    if warning:
        get_run_logger().warning(redact(warning))
    create_markdown_artifact(
        key="weight-diffusion-summary",
        markdown=(f"### Weight diffusion `{redact(result.uri)}`\n\nstep {result.step} (resumed from "
                  f"{result.resumed_from}), loss {result.loss:.4g}; {result.train_ids} rows trained on, "
                  f"{result.holdout_ids} held out.\n\nCheckpoint: `{redact(checkpoint)}`\n\n{redact(warning or '')}\n\n![loss]({data_uri})"),
    )
    return checkpoint


@flow(name="train-weight-diffusion", flow_run_name=dataset_run_name("train-weight-diffusion"))
def train_weight_diffusion_flow(config: wd.WeightDiffusionConfig) -> wd.TrainResult:
    """Train the text-conditioned weight denoiser on a dataset (minus held-out ids) and publish it; the run
    is named ``train-weight-diffusion-<dataset>`` and tagged ``dataset:<dataset>``."""
    tag_run(config.dataset)
    result = train(config)
    publish(result)
    return result
