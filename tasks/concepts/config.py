"""``EditFinetuneConfig``: the ``edit-lora`` engine's settings (editing concepts on the image-to-image base).

Its own module, free of torch: the CLI builds ``build --engine edit-lora``'s flags from it, and the flows'
config names it, without loading the engine. The shared training fields come from
``contract.TrainingConfig``; this adds the concept workload's own and sets the engine's defaults.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from weightzoo.tasks.finetune.contract import TrainingConfig

ALL_CONVS = ("inc", "down1", "down2", "mid", "up2", "up1", "outc")


class EditFinetuneConfig(TrainingConfig):
    """How to fine-tune each editing concept (saved with every row); shared fields: ``TrainingConfig``."""

    RENAMED: ClassVar[dict[str, str]] = {"batch_size": "pairs_per_step", "image_size": "resolution"}

    # Stored in every row's `method` column.
    # "edit-lora-fa" (LoRA-FA): A frozen to seeded orthogonal rows shared by every row (the layout rebuilds it),
    # B trained, so rows hold B and ΔW = B·A is linear in the row (docs/BENCHMARKS.md, "Edit LoRA rows").
    method: Literal["edit-lora", "edit-lora-fa"] = Field(
        "edit-lora", description="Adapter method: 'edit-lora': LoRA (A and B) on the edit base's convs; "
        "'edit-lora-fa': A frozen and shared by every row (rebuilt from the layout's seed), B trained, rows hold B.")
    # Rank 2 on every conv: ~7.7k values per concept on the default base, small enough for thousands of rows.
    rank: int = Field(2, ge=1, description="LoRA rank r.")
    # alpha = rank: scale 1, so learning rates do not depend on the rank.
    alpha: float = Field(2.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    # Every conv: colour edits live in the 1x1-like mixing of the outer layers, spatial ones in the inner.
    target_modules: tuple[str, ...] = Field(ALL_CONVS, min_length=1, description="Names of the base's convs to adapt.")
    # 100 steps at lr 5e-3 reach a plateau for single edits on the default base (docs/CONCEPTS.md).
    steps: int = Field(100, ge=1, description="Optimiser steps per concept.")
    pairs_per_step: int = Field(4, ge=1, description="Image pairs per concept per step.")
    learning_rate: float = Field(5e-3, gt=0, description="AdamW learning rate (constant after warm-up).")
    # torch's default. A larger epsilon (1e-3, 1e-2) makes rows smoother in the edit (a coordinate with a tiny
    # gradient then barely moves instead of stepping ~lr·sign(g)), but slows fine-tuning more than it helps a
    # weight generator: docs/BENCHMARKS.md, "Concept zoo" and "Edit LoRA rows".
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    # No decay: it would pull every row toward zero by an amount that depends on the steps, not the edit.
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    # 16 + 8 pairs: enough variety that a LoRA learns the edit, not the photos; 8 measure it.
    train_pairs: int = Field(16, ge=1, description="Training pairs per concept (rendered rows; files use theirs).")
    eval_pairs: int = Field(8, ge=1, description="Held-out pairs per concept, for PSNR.")
    # The source pool and the batch order are shared by all rows (the adapter init: `seed`).
    data_seed: int = Field(0, ge=0, description="Seed of the shared source images and of every step's pair choice.")
    loss_window: int = Field(10, ge=1, description="Steps averaged for the reported final loss.")
    # -- execution (does not change results beyond float tolerance) --------------------------------
    pack: int = Field(16, ge=1, description="Concepts trained together in one step (1 = sequential).")
    # Rows are small (thousands of values): float32 keeps them exact.
    weights_dtype: Literal["float16", "bfloat16", "float32"] = Field("float32", description="Storage dtype of the rows.")
    # fp32 by default: the base is small, so bf16 saves little, and rows stay what they were before autocast.
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "no", description="'auto': bf16 autocast on CUDA, fp32 elsewhere; 'no': fp32; 'bf16': autocast."
    )
