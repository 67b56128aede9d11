"""Parameter models of the dataset flows: each becomes the flow's form in the Prefect UI.

Frozen and JSON-serialisable, so the same request runs in-process or is sent to a GPU worker by
``run_deployment``. URIs only: credentials come from the worker's environment (AWS_* variables),
never from parameters, which Prefect stores and shows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.batch import DEFAULT_BATCH_SIZE
from weightzoo.tasks.finetune.engine import FinetuneConfig

# "<flow name>/<deployment name>" as created by deployments/prefect.yaml.
DEFAULT_DEPLOYMENT = "finetune-batch/gpu"


class BatchRequest(BaseModel):
    """One batch for ``finetune_batch``: which ids, from which manifest, on which base, into which dataset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_id: str = Field(description="Deterministic batch id (b-<hash of sorted ids>); names the shard and the run.")
    ids: list[str] = Field(min_length=1, description="Manifest ids to fine-tune in this batch.")
    manifest: str = Field(description="Manifest URI (jsonl/csv/parquet); relative image paths are taken against its folder.")
    base: str = Field(description="Base diffusers pipeline URI (local folder or s3://...).")
    dataset: str = Field(description="Dataset URI the shard is written to and committed in.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Fine-tune method and hyperparameters.")
    cache_dir: str | None = Field(None, description="URI caching class latents across batches (default: <dataset>/cache).")
    engine: str = Field(engines.DEFAULT_ENGINE, description="Fine-tune engine, by registered name (never a module path).")

    _engine = field_validator("engine")(engines.canonical)


class BuildRequest(BaseModel):
    """A dataset build: validate the manifest, train what is not committed yet, report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: str = Field(description="Manifest URI (jsonl/csv/parquet), validated whole before any training.")
    base: str = Field(description="Base diffusers pipeline URI (local folder or s3://...).")
    dataset: str = Field(description="Dataset URI (local folder or s3://bucket/prefix); reruns resume it.")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Items per batch: one child flow run, one shard.")
    executor: Literal["local", "deployment"] = Field(
        "local", description="'local': batches run in this process, one after another; 'deployment': one run "
        "of the finetune-batch deployment per batch, on a work pool's workers, concurrently.",
    )
    deployment: str = Field(DEFAULT_DEPLOYMENT, description="'<flow>/<deployment>' run per batch when executor='deployment'.")
    retry_failed: bool = Field(True, description="Re-attempt items whose last attempt failed.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Fine-tune method and hyperparameters.")
    cache_dir: str | None = Field(None, description="URI caching class latents across batches (default: <dataset>/cache).")
    engine: str = Field(engines.DEFAULT_ENGINE, description="Fine-tune engine, by registered name (never a module path).")

    _engine = field_validator("engine")(engines.canonical)
    batch_timeout_s: float = Field(
        6 * 3600, gt=0, description="executor='deployment': how long to wait for all batches before reporting the rest as pending."
    )
    poll_s: float = Field(5.0, gt=0, description="executor='deployment': seconds between checks of the batch runs.")

    def cache(self) -> str:
        return self.cache_dir or f"{self.dataset.rstrip('/')}/cache"

    def batch(self, batch_id: str, ids: list[str]) -> BatchRequest:
        return BatchRequest(batch_id=batch_id, ids=ids, manifest=self.manifest, base=self.base, dataset=self.dataset,
                            finetune=self.finetune, cache_dir=self.cache(), engine=self.engine)
