"""``pipeline``: the whole of weightzoo end to end, as one parent run the Prefect UI shows with its subflows.

base model → synthetic subjects + manifest → build_dataset → fit_subspace → train_weight_diffusion.
``weightzoo demo`` runs it on the embedded default (the tiny base, local disk, ephemeral API).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from pydantic import BaseModel, ConfigDict, Field

from weightzoo.flows.build_dataset import build_dataset
from weightzoo.flows.config import BuildConfig
from weightzoo.flows.fit_subspace import FitSubspaceConfig, fit_subspace
from weightzoo.flows.train_weight_diffusion import train_weight_diffusion_flow
from weightzoo.tasks.diffusion.generator import WeightDiffusionConfig
from weightzoo.tasks.finetune.config import FinetuneConfig
from weightzoo.tasks.subspace.pca import SubspaceConfig


class PipelineConfig(BaseModel):
    """One end-to-end run in a work folder; defaults finish in about two minutes on 2 CPU cores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workdir: str = Field(description="Work folder: base/, manifest.jsonl, images/, dataset/, subspace/, wdiff/.")
    subjects: int = Field(16, ge=2, description="Synthetic subjects (one LoRA each).")
    images_per_subject: int = Field(4, ge=1, description="Images drawn per subject.")
    batch_size: int = Field(8, ge=1, description="Subjects per fine-tune batch (one shard each).")
    # The tiny model learns in far fewer steps than SD 1.5's 800, at a higher learning rate; 32 px steps
    # are several times cheaper than its native 64 px (attention over 32×32 latents): BENCHMARKS.md.
    finetune: FinetuneConfig = Field(
        FinetuneConfig(steps=50, learning_rate=1e-3, resolution=32, num_class_images=8, class_inference_steps=10),
        description="Fine-tune settings (the demo's are scaled down for the tiny model).",
    )
    components: int = Field(8, ge=1, description="Principal components of the subspace.")
    diffusion_steps: int = Field(300, ge=1, description="Training steps of the weight-diffusion model.")


@task(name="make-base")
def make_base(workdir: str) -> str:
    """The tiny offline base model in ``workdir/base`` (kept if already there)."""
    from weightzoo.tasks.finetune.base_model import save_tiny_pipeline

    base = Path(workdir) / "base"
    if not (base / "model_index.json").exists():
        save_tiny_pipeline(base)
    return str(base)


@task(name="make-subjects")
def make_subjects(workdir: str, n: int, images_per_subject: int) -> str:
    """Synthetic subjects with known attributes and their manifest (deterministic, so reruns resume)."""
    from weightzoo.tasks.finetune.synthetic import write_demo_manifest

    return write_demo_manifest(workdir, n, images_per_subject=images_per_subject)


@flow(name="pipeline", flow_run_name="pipeline-{request.subjects}-subjects")
def pipeline(request: PipelineConfig) -> dict[str, Any]:
    """Build a dataset from scratch and learn from it: every stage is its own subflow run."""
    work = Path(request.workdir)
    base = make_base(str(work))
    manifest = make_subjects(str(work), request.subjects, request.images_per_subject)
    dataset, subspace, wdiff = str(work / "dataset"), str(work / "subspace"), str(work / "wdiff")
    built = build_dataset(
        BuildConfig(manifest=manifest, base=base, dataset=dataset, batch_size=request.batch_size, finetune=request.finetune)
    )
    components = min(request.components, max(int(built["committed"]) - 1, 1))
    fit_subspace(FitSubspaceConfig(dataset=dataset, out=subspace, options=SubspaceConfig(components=components)))
    train_weight_diffusion_flow(
        WeightDiffusionConfig(dataset=dataset, base=base, out=wdiff, steps=request.diffusion_steps, checkpoint_every=100)
    )
    return {"base": base, "manifest": manifest, "dataset": dataset, "subspace": subspace, "wdiff": wdiff, "build": built}
