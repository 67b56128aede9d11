"""The engine contract: what every fine-tune engine takes (``TrainingConfig``), returns (``BatchResult``)
and is registered as (``Engine``). Both built-in engines (``diffusers-lora``, ``edit-lora``) and any
plugin import these names from here, and nothing here knows a workload.

``TrainingConfig`` holds the training fields every engine shares (optimiser, schedule, clip, seed,
image size, packing); an engine's config derives from it, adds its own fields and sets its own
defaults. The shared batch driver (``driver.py``) reads only these fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # annotations only: the configs import this module, and `--help` must not import torch
    import torch

    from weightzoo.storage.layout import Layout


# Defaults of a build's parameters (flows/config.py) and of ``batch.run_batch``, here so that neither the
# CLI's flags nor the flows' config import the batch module's torch.
# A deployment batch is one fresh worker process whose start (imports, base load, API calls) must stay a
# small share of its training time, while a crash loses at most the batch in flight: 64 keeps the start
# under 1% at weightzoo's defaults (docs/BENCHMARKS.md, "Orchestration overhead").
DEFAULT_BATCH_SIZE = 64
# A batch's lease outlives a killed holder by at most this long (renewed every third of it while training).
LEASE_TTL_S = 120.0


class TrainingConfig(BaseModel):
    """Training fields shared by every engine (an engine's config subclasses this and sets its defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Fields that change how fast a row trains or what is reported, not its weights (beyond float
    # tolerance): a dataset's recipe (storage/card.py) ignores them, so a rerun may change them freely.
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"pack", "mixed_precision", "check_every", "loss_window"})
    # Keys stored hparams may still use for a field that was renamed (old name -> new name).
    RENAMED: ClassVar[dict[str, str]] = {}

    rank: int = Field(1, ge=1, description="LoRA rank r.")
    alpha: float = Field(1.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    steps: int = Field(800, ge=1, description="Optimiser steps per row.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (constant after warm-up).")
    # 0 = constant schedule; a warm-up helps at high learning rates.
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the constant learning rate.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay.")
    # Clipped per row (never across a pack), so packing cannot change a row's update.
    max_grad_norm: float | None = Field(1.0, gt=0, description="Per-row gradient-norm clip; None disables it.")
    # None = the base's native size.
    resolution: int | None = Field(None, ge=8, description="Training resolution in pixels; default the base's own.")
    # One seed for the shared adapter init: every row starts from the same point, as PCA over rows assumes.
    seed: int = Field(0, ge=0, description="Seed of the shared adapter init (the same for every row).")
    # Final loss = mean of this many last steps: one step's loss depends heavily on its sample.
    loss_window: int = Field(20, ge=1, description="Steps averaged for the reported final loss.")
    # -- execution (do not change results beyond float tolerance) ------------------------------------
    # Rows per forward/backward. Bigger packs fill a GPU better; on OOM a pack is split and retried.
    pack: int = Field(4, ge=1, description="Rows trained together in one batched step (1 = sequential).")
    weights_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Storage dtype of the flattened weights."
    )
    # bf16 autocast on CUDA halves activation memory and doubles matmul speed; CPUs run fp32.
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="'auto': bf16 autocast on CUDA, fp32 elsewhere; 'no': fp32; 'bf16': autocast."
    )
    # Reading losses back forces a device sync; every few steps keeps the GPU queue full.
    check_every: int = Field(10, ge=1, description="Steps between NaN checks and progress reports.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        """Old field names (``RENAMED``) mapped to the new ones, so stored hparams still load."""
        if not isinstance(data, dict) or not cls.RENAMED:
            return data
        out = dict(data)
        for old, new in cls.RENAMED.items():
            if old in out and new not in out:
                out[new] = out.pop(old)
        return out


@dataclass
class ItemResult:
    """One row's outcome: its weights and loss, or why it failed (for the ledger and the UI)."""

    id: str
    ok: bool
    weights: torch.Tensor | None  # 1-D, flattened with the batch layout, storage dtype, CPU
    loss: float | None  # mean of the last `loss_window` steps
    steps: int  # steps trained (for a failure: the step it failed at)
    seconds: float  # this row's share of wall time: its input preparation + its pack's training / pack size
    reason: str | None
    loss_history: list[float] = field(default_factory=list)  # per-step loss, for curves and tests
    # Per step as well, for trackers (``--report-to tensorboard``): the learning rate the step used and the
    # row's own gradient norm before its clip (NaN where the row did not train that step).
    lr_history: list[float] = field(default_factory=list)
    grad_norm_history: list[float] = field(default_factory=list)


@dataclass
class BatchResult:
    layout: Layout
    results: list[ItemResult]
    hparams: dict  # the resolved config, stored with every row


class RowRules:
    """A workload's rules for a manifest row, beyond the shared ones (ids, fields, images decode).

    The manifest validator asks the chosen engine's rules; these base rules add nothing but refuse
    ``targets`` (a field only an image-pair workload's rules accept).
    """

    def problems(self, row: Any, base_uri: str | None) -> list[str]:
        """What is wrong with ``row`` for this workload (empty: nothing)."""
        return ["'targets' is only for kind 'edit'"] if row.targets is not None else []

    def images(self, row: Any, base_uri: str | None) -> tuple[list[str], str | None] | None:
        """The row's image URIs to check, or why there are none; None: the shared rule (images, image_dir)."""
        return None


@dataclass(frozen=True)
class Engine:
    """A named fine-tune engine: base loader, base fingerprint, batch preparation for the shared driver
    (``driver.train_batch`` trains what it prepares), its config model and the manifest checks its rows
    need beyond the shared ones; optionally a light base check, a toy base and demo rows.

    It is the one place a workload is named: the build's checks, the flows' config, ``weightzoo base`` and
    ``weightzoo demo`` ask the engine and name none. An engine may leave the optional hooks None (a plugin
    usually does): then a build checks only that a local base path exists (a URI is left to the loader),
    and ``weightzoo base --engine``/the demo refuse it in one line.
    """

    name: str
    load_base: Callable[[str, str], Any]  # (base URI, device) -> loaded base; called once per process
    fingerprint: Callable[[str], str]  # base URI -> short hash recorded with every row
    prepare: Callable[..., Any]  # (base, items, config, *, base_uri, cache_dir) -> driver.Prepared
    config: type  # the pydantic model of its fine-tune settings
    rows: RowRules = field(default_factory=RowRules)  # its manifest rows' rules (manifest validation)
    # (base URI, dataset, device, examples per row per step) -> a task loss ``(ids, rows, generator) -> scalar``,
    # differentiable in the (n, D) rows: the weight generator's objective 'task' (tasks/diffusion/objective.py).
    # None: the workload makes no examples.
    task_loss: Callable[..., Any] | None = None
    # base URI -> None, or a one-line ``InputError``/``NotFoundError`` (no flag name: the caller adds it).
    # Reads index files only and loads nothing: the CLI runs it before any server starts, the build flow
    # before any batch. None: only that a local base exists.
    check_base: Callable[[str], None] | None = None
    # (out, *, seed, **options) -> base URI: a small base made offline (nothing downloaded) at ``out``, kept
    # when ``out`` already holds it; for tests, benches, the demo and ``weightzoo base``. None: no toy base.
    toy_base: Callable[..., str] | None = None
    # (workdir, items, **options) -> manifest URI: ``items`` demo rows (and their files) under ``workdir``,
    # deterministic so that a rerun resumes; the demo pipeline's manifest. None: no demo.
    demo_rows: Callable[..., str] | None = None
