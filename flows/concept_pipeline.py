"""``concept_pipeline``: the concept workload end to end, as one parent flow run with its stages as tasks.

edit base (pretrained offline) → concept manifest (procedural edit specs) → ``build_dataset`` with the
``edit-lora`` engine (validation, one shard and ledger commit per batch; a rerun trains only what is
missing) → the weight generator with the structured condition. ``weightzoo demo --kind edit`` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from pydantic import BaseModel, ConfigDict, Field

from weightzoo.flows.build_dataset import build_dataset
from weightzoo.flows.config import BuildConfig
from weightzoo.flows.train_weight_diffusion import train_weight_diffusion_flow
from weightzoo.tasks.concepts.engine import EditFinetuneConfig
from weightzoo.tasks.diffusion.generator import WeightDiffusionConfig


class ConceptPipelineConfig(BaseModel):
    """One end-to-end concept run in a work folder; defaults finish in a few minutes on 2 CPU cores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workdir: str = Field(description="Work folder: base/, manifest.jsonl, dataset/, wdiff/.")
    concepts: int = Field(48, ge=2, description="Editing concepts (one LoRA each).")
    # 200 steps of 32 images: the base learns general editing features in about a minute on 2 cores.
    base_steps: int = Field(200, ge=0, description="Pretraining steps of the edit base.")
    batch_size: int = Field(16, ge=1, description="Concepts per batch (one shard each).")
    finetune: EditFinetuneConfig = Field(EditFinetuneConfig(steps=60, learning_rate=1e-2),
                                         description="Fine-tune settings (60 steps at lr 1e-2 for the demo).")
    diffusion_steps: int = Field(300, ge=1, description="Training steps of the weight generator.")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of concepts the generator never sees.")


@task(name="make-edit-base")
def make_edit_base(workdir: str, steps: int) -> str:
    from weightzoo.tasks.concepts.base import make_base

    return make_base(str(Path(workdir) / "base"), steps)


@task(name="make-concepts")
def make_concepts(workdir: str, n: int) -> str:
    from weightzoo.tasks.concepts.zoo import concept_rows, write_concept_manifest

    return write_concept_manifest(concept_rows(n), str(Path(workdir) / "manifest.jsonl"))


@flow(name="concept-pipeline", flow_run_name="concepts-{request.concepts}")
def concept_pipeline(request: ConceptPipelineConfig) -> dict[str, Any]:
    """Build a concept dataset from scratch and train the structured weight generator on it."""
    work = Path(request.workdir)
    base = make_edit_base(str(work), request.base_steps)
    manifest = make_concepts(str(work), request.concepts)
    dataset, wdiff = str(work / "dataset"), str(work / "wdiff")
    built = build_dataset(BuildConfig(manifest=manifest, base=base, dataset=dataset, engine="edit-lora",
                                       batch_size=request.batch_size, finetune=request.finetune))
    train_weight_diffusion_flow(WeightDiffusionConfig(
        dataset=dataset, base=base, out=wdiff, condition="structured", steps=request.diffusion_steps,
        holdout_fraction=request.holdout_fraction, block_size=256, width=64, depth=2, learning_rate=3e-3, checkpoint_every=100))
    return {"base": base, "manifest": manifest, "dataset": dataset, "wdiff": wdiff, "build": built}
