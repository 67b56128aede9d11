"""``pipeline``: a workload end to end, as one parent run the Prefect UI shows with its stages.

base model → synthetic manifest → ``build_dataset`` → ``fit_subspace`` (identity only) → ``train_weight_diffusion``.
The workload (``PipelineConfig.workload``) picks the base, the manifest, the fine-tune engine and the
generator's condition (flows/config.py ``WORKLOADS``); the stages and their order are the same.
``weightzoo demo`` runs it on the embedded default (tiny bases, local disk, ephemeral API);
``weightzoo demo --kind edit`` runs the image-editing concepts (docs/CONCEPTS.md).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from weightzoo.flows.build_dataset import build_dataset
from weightzoo.flows.config import PipelineConfig
from weightzoo.flows.fit_subspace import fit_subspace
from weightzoo.flows.train_weight_diffusion import train_weight_diffusion_flow


@task(name="make-base", task_run_name="make-{workload}-base")
def make_base(workload: str, uri: str, base_steps: int) -> str:
    """The workload's offline base at ``uri`` (kept if already there): the tiny SD-style pipeline, or the
    edit base pretrained ``base_steps`` steps."""
    if workload == "edit":
        from weightzoo.tasks.concepts.base import make_base as make_edit_base

        return make_edit_base(uri, base_steps)
    from pathlib import Path

    from weightzoo.tasks.finetune.base_model import save_tiny_pipeline

    if not (Path(uri) / "model_index.json").exists():
        save_tiny_pipeline(Path(uri))
    return uri


@task(name="make-manifest", task_run_name="make-{items}-{workload}-rows")
def make_manifest(workload: str, workdir: str, items: int, images_per_subject: int) -> str:
    """Synthetic subjects with known attributes (and their images), or procedural edit concepts, as
    ``workdir/manifest.jsonl`` (deterministic, so reruns resume)."""
    if workload == "edit":
        from weightzoo.tasks.concepts.zoo import concept_rows, write_concept_manifest

        return write_concept_manifest(concept_rows(items), f"{workdir.rstrip('/')}/manifest.jsonl")
    from weightzoo.tasks.finetune.synthetic import write_demo_manifest

    return write_demo_manifest(workdir, items, images_per_subject=images_per_subject)


@flow(name="pipeline", flow_run_name="pipeline-{config.workload}-{config.items}")
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Build a dataset from scratch and learn from it: every stage is its own task or subflow run."""
    base = make_base(config.workload, config.path("base"), config.base_steps)
    manifest = make_manifest(config.workload, config.workdir, config.items, config.images_per_subject)
    built = build_dataset(config.build(base, manifest))
    subspace = config.fit_subspace(built["committed"])
    if subspace is not None:
        fit_subspace(subspace)
    generator = config.generator(base)
    train_weight_diffusion_flow(generator)
    return {"base": base, "manifest": manifest, "dataset": config.path("dataset"), "build": built, "wdiff": generator.out,
            "subspace": subspace.out if subspace else None}
