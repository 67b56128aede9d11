"""Parameter models of the dataset flows: each becomes the flow's form in the Prefect UI.

Frozen and JSON-serialisable, so the same request runs in-process or is sent to a GPU worker by
``run_deployment``. URIs only: credentials come from the worker's environment (AWS_* variables),
never from parameters, which Prefect stores and shows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from weightzoo.tasks.concepts.engine import EditFinetuneConfig
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.batch import DEFAULT_BATCH_SIZE, LEASE_TTL_S
from weightzoo.tasks.finetune.engine import FinetuneConfig

# The fine-tune settings of any built-in engine, told apart by their ``method`` (the UI renders one form each).
AnyFinetuneConfig = Annotated[FinetuneConfig | EditFinetuneConfig, Field(discriminator="method")]

# "<flow name>/<deployment name>" as created by deployments/prefect.yaml.
DEFAULT_DEPLOYMENT = "finetune-batch/gpu"


def _engine_default_config(data: Any) -> Any:
    """Without ``finetune``, the named engine's own config with its defaults (not the default engine's)."""
    if isinstance(data, dict) and data.get("finetune") is None and data.get("engine"):
        data = {**data, "finetune": engines.get(data["engine"]).config()}
    return data


def _absolute(value: str | None, info: ValidationInfo) -> str | None:
    """A local path must be absolute: a deployment's run starts in the code checkout, not the user's folder."""
    if value is None or "://" in value or value.startswith("/"):
        return value
    raise ValueError(f"{info.field_name} must be an absolute path or a URI (a run may start in another folder), "
                     f"got {value!r}")


def _check_engine_config(request: Any) -> Any:
    want = engines.get(request.engine).config
    if not isinstance(request.finetune, want):
        raise ValueError(f"engine {request.engine!r} takes a {want.__name__}, got method {request.finetune.method!r}")
    return request


class _JobConfig(BaseModel):
    """What a build and each of its batches share: the manifest, the base, the dataset, the engine and its settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: str = Field(description="Manifest URI (jsonl/csv/parquet), validated whole before any training; "
                          "relative image paths are taken against its folder.")
    base: str = Field(description="Base model URI (local folder or s3://...).")
    dataset: str = Field(description="Dataset URI (local folder or s3://bucket/prefix); reruns resume it.")
    finetune: AnyFinetuneConfig = Field(default_factory=FinetuneConfig, description="Fine-tune method and hyperparameters.")
    cache_dir: str | None = Field(None, description="URI caching class latents across batches (default: <dataset>/cache).")
    engine: str = Field(engines.DEFAULT_ENGINE, description="Fine-tune engine, by registered name (never a module path).")
    # Renewed every third of it while a batch trains: a killed holder delays its batch by at most this long.
    lease_ttl_s: float = Field(LEASE_TTL_S, ge=1, description="Lifetime of a batch's lease (seconds) without renewal.")

    _engine = field_validator("engine")(engines.canonical)
    _paths = field_validator("manifest", "base", "dataset", "cache_dir")(_absolute)
    _default_config = model_validator(mode="before")(lambda data: _engine_default_config(data))
    _matching_config = model_validator(mode="after")(lambda self: _check_engine_config(self))


class BatchConfig(_JobConfig):
    """One batch for ``finetune_batch``: which ids, from which manifest, on which base, into which dataset."""

    batch_id: str = Field(description="Deterministic batch id (b-<hash of sorted ids>); names the shard and the run.")
    ids: list[str] = Field(min_length=1, description="Manifest ids to fine-tune in this batch.")
    build_id: str | None = Field(None, description="The parent build's run id: its rerun of this batch takes over "
                                 "the lease a crashed attempt left, instead of waiting for it to expire.")


class BuildConfig(_JobConfig):
    """A dataset build: validate the manifest, train what is not committed yet, report."""

    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Items per batch: one child flow run, one shard.")
    executor: Literal["local", "deployment"] = Field(
        "local", description="'local': batches run in this process, one after another; 'deployment': one run "
        "of the finetune-batch deployment per batch, on a work pool's workers, concurrently.",
    )
    deployment: str = Field(DEFAULT_DEPLOYMENT, description="'<flow>/<deployment>' run per batch when executor='deployment'.")
    retry_failed: bool = Field(True, description="Re-attempt items whose last attempt failed.")
    batch_timeout_s: float = Field(
        6 * 3600, gt=0, description="executor='deployment': how long to wait for all batches before reporting the rest as pending."
    )
    poll_s: float = Field(5.0, gt=0, description="executor='deployment': seconds between checks of the batch runs.")
    rounds: int = Field(
        2, ge=1, description="executor='deployment': submission rounds; after each, the still-pending ids of "
        "batch runs that crashed (e.g. marked Crashed when a killed worker's heartbeats stopped) or failed are "
        "re-planned and submitted again, so a lost worker costs one batch's time and no manual rerun.",
    )

    def cache(self) -> str:
        return self.cache_dir or f"{self.dataset.rstrip('/')}/cache"

    def batch(self, batch_id: str, ids: list[str], build_id: str | None = None) -> BatchConfig:
        return BatchConfig(batch_id=batch_id, ids=ids, manifest=self.manifest, base=self.base, dataset=self.dataset,
                           finetune=self.finetune, cache_dir=self.cache(), engine=self.engine, build_id=build_id,
                           lease_ttl_s=self.lease_ttl_s)
