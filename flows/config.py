"""Parameter models of every flow: each becomes the flow's form in the Prefect UI.

One naming rule: a flow takes one parameter, ``config``, whose model is ``<Subject>Config`` and is
defined here (``BuildConfig``, ``BatchConfig``, ``FitSubspaceConfig``, ``PipelineConfig``), or, where the
algorithm saves its own config beside its output, imported here from it (``WeightDiffusionConfig``).
``batch_size`` means one thing: manifest items per batch (one child run, one shard).

Free of torch and Prefect (the models come from the tasks' torch-free ``config`` modules): the CLI
builds its flags from these models, and ``--help`` answers without loading either.

A build's ``finetune`` is the named engine's own config model (``engines.get(engine).config``, a plugin's
too), never a closed union of the built-in ones: the form takes it as a table of that model's fields.

Frozen and JSON-serialisable (``Model(**m.model_dump(mode="json")) == m``), so the same config runs
in-process or is sent to a GPU worker by ``run_deployment``. URIs only: credentials come from the worker's environment (AWS_* variables),
never from parameters, which Prefect stores and shows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from weightzoo.tasks.concepts.config import EditFinetuneConfig
from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.contract import DEFAULT_BATCH_SIZE, LEASE_TTL_S, TrainingConfig
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.families import FAMILIES
from weightzoo.tasks.subspace.config import SubspaceConfig
from weightzoo.tasks.world.config import WORLD_FINETUNE

# "<flow name>/<deployment name>" as created by deployments/prefect.yaml.
DEFAULT_DEPLOYMENT = "finetune-batch/gpu"

# The fine-tune settings of whichever engine is named: held as that engine's own config model (an instance
# of a ``TrainingConfig`` subclass), given as a table of its fields. Prefect's form and its parameter check
# see an open object (any engine's fields are valid JSON there); ``engine_config`` validates it against the
# named engine's model, and dumping gives all of that model's fields back as JSON.
EngineSettings = Annotated[Any, WithJsonSchema({
    "type": "object", "additionalProperties": True,
    "description": "The engine's fine-tune settings, as a table of its config's fields (empty: its defaults); "
                   "`weightzoo build --engine NAME --help` lists them.",
})]


def engine_config(engine: str, value: Any) -> TrainingConfig:
    """``value`` (a table of fields, None for the defaults, or an instance) as ``engine``'s own config model."""
    model = engines.get(engine).config
    if value is None:
        return model()
    if isinstance(value, model):
        return value
    if isinstance(value, BaseModel):
        raise ValueError(f"engine {engine!r} takes {model.__name__} settings, got a {type(value).__name__}")
    if not isinstance(value, dict):
        raise ValueError(f"engine {engine!r} takes a table of {model.__name__} fields, got {type(value).__name__}")
    return model.model_validate(value)


def _finetune_of_engine(value: Any, info: ValidationInfo) -> Any:
    """``finetune`` validated by the engine named before it (a refused engine name is reported on its own)."""
    engine = info.data.get("engine")
    return value if engine is None else engine_config(engine, value)


def _absolute(value: str | None, info: ValidationInfo) -> str | None:
    """A local path must be absolute: a deployment's run starts in the code checkout, not the user's folder."""
    if value is None or "://" in value or value.startswith("/"):
        return value
    raise ValueError(f"{info.field_name} must be an absolute path or a URI (a run may start in another folder), "
                     f"got {value!r}")


class _JobConfig(BaseModel):
    """What a build and each of its batches share: the manifest, the base, the dataset, the engine and its settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: str = Field(description="Manifest URI (jsonl/csv/parquet), validated whole before any training; "
                          "relative image paths are taken against its folder.")
    base: str = Field(description="Base model URI (local folder or s3://...).")
    dataset: str = Field(description="Dataset URI (local folder or s3://bucket/prefix); reruns resume it.")
    # Before ``finetune``: that field is validated by this engine's own config model.
    engine: str = Field(engines.DEFAULT_ENGINE, description="Fine-tune engine, by registered name (never a module path).")
    finetune: EngineSettings = Field(default_factory=dict, validate_default=True, title="Fine-tune settings")
    cache_dir: str | None = Field(None, description="URI caching class latents across batches (default: <dataset>/cache).")
    # Renewed every third of it while a batch trains: a killed holder delays its batch by at most this long.
    lease_ttl_s: float = Field(LEASE_TTL_S, ge=1, description="Lifetime of a batch's lease (seconds) without renewal.")
    # The diffusers scripts' switch; 'none' by default, so a build needs no tracking package.
    report_to: Literal["none", "tensorboard"] = Field(
        "none", description="Where per-row training curves go besides the dataset's loss_history column: "
        "'tensorboard' writes each row's loss, lr and grad_norm as TensorBoard events (needs weightzoo[tracking]).")
    logging_dir: str | None = Field(
        None, description="report_to='tensorboard': URI of the event files, one run per row at "
        "<logging_dir>/<dataset name>/<batch>/<row id> (default <dataset>/_tensorboard/<batch>/<row id>).")

    _engine = field_validator("engine")(engines.canonical)
    _paths = field_validator("manifest", "base", "dataset", "cache_dir", "logging_dir")(_absolute)
    _finetune = field_validator("finetune", mode="before")(_finetune_of_engine)


class BatchConfig(_JobConfig):
    """One batch for ``finetune_batch``: which ids, from which manifest, on which base, into which dataset."""

    batch_id: str = Field(description="Deterministic batch id (b-<hash of sorted ids>); names the shard and the run.")
    ids: list[str] = Field(min_length=1, description="Manifest ids to fine-tune in this batch.")
    build_id: str | None = Field(None, description="The parent build's run id: its rerun of this batch takes over "
                                 "the lease a crashed attempt left, instead of waiting for it to expire.")

    def tensorboard_dir(self) -> str:
        """Where this batch's TensorBoard runs go (one folder per row below it)."""
        from weightzoo.flows.names import dataset_name
        from weightzoo.storage.fs import join
        from weightzoo.tasks.finetune.tracking import TENSORBOARD_DIR

        if self.logging_dir is None:
            return join(self.dataset, TENSORBOARD_DIR, self.batch_id)
        return join(self.logging_dir, dataset_name(self.dataset), self.batch_id)


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
                           lease_ttl_s=self.lease_ttl_s, report_to=self.report_to, logging_dir=self.logging_dir)


class FitSubspaceConfig(BaseModel):
    """``fit_subspace``'s parameters: the dataset, the output, the PCA options and where the shard tasks run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(description="Dataset URI to fit (local path or s3://bucket/prefix).")
    out: str = Field(description="Subspace URI to write: subspace.safetensors, coords.parquet, card.json, plot.")
    work: str | None = Field(None, description="Work URI for partials and bases; default <out>/_work/<token>.")
    options: SubspaceConfig = Field(default_factory=SubspaceConfig, description="PCA options.")
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="Where the per-shard-group tasks run: 'threads' in the flow's process; 'dask' on "
        "a Dask cluster (dask_address, or a local cluster of dask_workers processes).",
    )
    dask_address: str | None = Field(
        None, description="task_runner='dask': scheduler address of an existing cluster (tcp://host:8786); "
        "None starts a local cluster on 127.0.0.1 for this run.",
    )
    dask_workers: int = Field(2, ge=1, description="task_runner='dask' without an address: local worker processes.")


# The demo's presets: what a pipeline run of each workload differs in; every other setting is the
# PipelineConfig field's. A workload names its engine, and the pipeline takes the engine's toy base, demo rows
# and config from it (``contract.Engine``), so no stage names a workload's code; ``base_options`` and
# ``row_options`` say which PipelineConfig fields go to the engine's ``toy_base`` and ``demo_rows`` (option
# name -> field name).
# The tiny identity model learns in far fewer steps than SD 1.5's 800, at a higher learning rate, and 32 px
# steps are several times cheaper than its native 64 px; the edit base learns a concept in 60 steps at 1e-2.
WORKLOADS: dict[str, dict[str, Any]] = {
    "identity": {
        "engine": engines.DEFAULT_ENGINE, "items": 16, "batch_size": 8,
        "finetune": FinetuneConfig(steps=50, learning_rate=1e-3, resolution=32, num_class_images=8,
                                   class_inference_steps=10),
        # attributes as one-hots: on 256 world identities asked for 16 attribute combinations none of them has, its
        # LoRAs drew the request 0.74 of the time (the identities' own LoRAs: 0.71; the text condition 0.62, and
        # on the demo's 16 rows the text generator ignored its condition: docs/BENCHMARKS.md "Identity world")
        "fit_subspace": True, "generator": {"condition": "structured"},
        "base_options": {"family": "family"}, "row_options": {"images_per_subject": "images_per_subject"},
    },
    "edit": {
        "engine": "edit-lora", "items": 48, "batch_size": 16,
        "finetune": EditFinetuneConfig(steps=60, learning_rate=1e-2),
        "base_options": {"steps": "base_steps"}, "row_options": {},
        "fit_subspace": False,  # the edit workload trains its generator on the rows directly: no PCA stage
        # residual on the 4 nearest rows, trained through the base: of the generators the concept-zoo bench
        # measured, its starts beat the most baselines (docs/BENCHMARKS.md "Concept zoo"; none beats k-nearest).
        "generator": {"condition": "structured", "holdout_fraction": 0.1, "block_size": 256, "width": 64, "depth": 2,
                      "learning_rate": 3e-3, "residual_k": 4, "objective": "task"},
    },
}


def _workload_defaults(data: Any) -> Any:
    """The workload's own item count, batch size and fine-tune settings where the caller gave none."""
    if isinstance(data, dict):
        defaults = WORKLOADS[data.get("workload", "identity")]
        data = {**data, **{k: defaults[k] for k in ("items", "batch_size", "finetune") if data.get(k) in (None, {})}}
        if data.get("identity_base", "world") == "world" and data["finetune"] is WORKLOADS["identity"]["finetune"]:
            data["finetune"] = WORLD_IDENTITY  # the world base's identities (tasks/world)
    return data


WORLD_IDENTITY = FinetuneConfig(**WORLD_FINETUNE)
WORLD = "world"  # the identity workload's shipped base and its subjects (tasks/world): a base kind, not an engine


def _finetune_of_workload(value: Any, info: ValidationInfo) -> Any:
    """``finetune`` validated by the workload's engine's own config model."""
    workload = info.data.get("workload")
    return value if workload is None else engine_config(WORKLOADS[workload]["engine"], value)


def _family_on_toy(family: str, info: ValidationInfo) -> str:
    """A family other than sd names a toy base: the world base is an sd pipeline."""
    if family != "sd" and info.data.get("workload") == "identity" and info.data.get("identity_base") == WORLD:
        raise ValueError(f"family {family!r} is for identity_base 'toy'; the world base is an sd pipeline")
    return family


class PipelineConfig(BaseModel):
    """One end-to-end run of a workload in a work folder: base → manifest → build → (subspace) → generator.

    Defaults finish in a few minutes on 2 CPU cores."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workdir: str = Field(description="Work folder: base/, manifest.jsonl, images/, dataset/, subspace/, wdiff/.")
    workload: Literal["identity", "edit"] = Field(
        "identity", description="identity: synthetic subjects on the tiny text-to-image base; edit: image-editing "
        "concepts on a small image-to-image base (docs/CONCEPTS.md).")
    items: int = Field(None, ge=2, description="Synthetic subjects or editing concepts, one LoRA each "
                       f"(default {WORKLOADS['identity']['items']} identity, {WORKLOADS['edit']['items']} edit).")
    images_per_subject: int = Field(4, ge=1, description="identity: images drawn per subject.")
    # 'world' by default: its default base ships with weightzoo (tasks/world/shipped), so the demo draws in
    # minutes; 'toy' keeps the random-weights path at SD 1.5's shapes for mechanics, benches and the GPU check.
    identity_base: Literal["world", "toy"] = Field(
        "world", description="identity: 'world' is a tiny base that draws the procedural world and trains "
        "one LoRA per world subject (pictures show what each learnt); 'toy' is the random-weights SD-1.5-shaped "
        "pipeline on synthetic subjects (mechanics only: its pictures are noise).")
    # The family of the tiny pipeline; the identity engine detects it from the base, so only the base needs it.
    family: Literal[tuple(FAMILIES)] = Field(  # type: ignore[valid-type]
        "sd", description="identity on the toy base: model family of the tiny pipeline "
        f"({', '.join(FAMILIES)}); the world base is sd.")
    previews: int = Field(16, ge=0, description="identity on the world base: rows given a preview grid PNG.")
    # 200 steps of 32 images: the edit base learns general editing features in about a minute on 2 cores.
    base_steps: int = Field(200, ge=0, description="edit: pretraining steps of the edit base.")
    batch_size: int = Field(None, ge=1, description="Items per batch (one shard each; default "
                            f"{WORKLOADS['identity']['batch_size']} identity, {WORKLOADS['edit']['batch_size']} edit).")
    finetune: EngineSettings = Field(default_factory=dict, validate_default=True, title="Fine-tune settings "
                                     "(empty: the workload's, scaled down for the tiny bases)")
    components: int = Field(8, ge=1, description="identity: principal components of the subspace.")
    diffusion_steps: int = Field(300, ge=1, description="Training steps of the weight generator.")

    _defaults = model_validator(mode="before")(lambda data: _workload_defaults(data))
    _finetune = field_validator("finetune", mode="before")(_finetune_of_workload)
    _family = field_validator("family")(_family_on_toy)

    def path(self, name: str) -> str:
        return f"{self.workdir.rstrip('/')}/{name}"

    @property
    def engine(self) -> str:
        """The workload's engine: its toy base, demo rows and fine-tune config make the run."""
        return WORKLOADS[self.workload]["engine"]

    def base_kind(self) -> str:
        """``world`` (the shipped world base and its subjects), or the engine whose toy base and demo rows are used."""
        return WORLD if self.workload == "identity" and self.identity_base == WORLD else self.engine

    def base_options(self) -> dict[str, Any]:
        """This run's options for the engine's ``toy_base`` (none for the world base)."""
        if self.base_kind() == WORLD:
            return {}
        return {option: getattr(self, name) for option, name in WORKLOADS[self.workload]["base_options"].items()}

    def row_options(self) -> dict[str, Any]:
        """This run's options for the engine's ``demo_rows`` (the world's subjects take the same)."""
        return {option: getattr(self, name) for option, name in WORKLOADS[self.workload]["row_options"].items()}

    def build(self, base: str, manifest: str) -> BuildConfig:
        """The build stage's config: this workload's engine on the work folder's dataset."""
        return BuildConfig(manifest=manifest, base=base, dataset=self.path("dataset"), finetune=self.finetune,
                           engine=self.engine, batch_size=self.batch_size)

    def fit_subspace(self, committed: int) -> FitSubspaceConfig | None:
        """The subspace stage's config (None for a workload without one); never more components than rows − 1."""
        if not WORKLOADS[self.workload]["fit_subspace"]:
            return None
        components = min(self.components, max(committed - 1, 1))
        return FitSubspaceConfig(dataset=self.path("dataset"), out=self.path("subspace"),
                                 options=SubspaceConfig(components=components))

    def generator(self, base: str) -> WeightDiffusionConfig:
        """The weight generator's config: the workload's condition and size, checkpoints every 100 steps."""
        return WeightDiffusionConfig(dataset=self.path("dataset"), base=base, out=self.path("wdiff"),
                                     steps=self.diffusion_steps, checkpoint_every=100,
                                     **WORKLOADS[self.workload]["generator"])
