"""``FinetuneConfig``: the ``diffusers-lora`` engine's settings (identities on a Stable Diffusion base).

Its own module, so that the recipes, the engine and the export all import it without importing each
other, and free of torch: the CLI builds ``build``'s flags from it (``--help`` answers at once). The shared training fields come from ``contract.TrainingConfig``; this adds the method, the
target layers, prior preservation and the UNet's execution knobs, with weights2weights' defaults.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from weightzoo.tasks.finetune.contract import TrainingConfig
from weightzoo.tasks.identity import recipes


class FinetuneConfig(TrainingConfig):
    """How to fine-tune each row: method, hyperparameters and execution knobs (saved with every row)."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = TrainingConfig.EXECUTION_FIELDS | {"compile", "gradient_checkpointing"}
    RENAMED: ClassVar[dict[str, str]] = {"batch_size": "images_per_step"}

    # -- method ------------------------------------------------------------------------------------
    # A registered recipe (tasks/identity/recipes/, docs/RECIPES.md): "lora" trains A and B; "orthogonal"
    # fixes A to id-derived orthogonal rows (Po et al. 2024) so models can be summed; "lora_fa" fixes A to one
    # seeded orthogonal basis shared by every row (rows hold B: one chart for PCA and generators); "celeb_basis" learns
    # word-embedding coefficients over a basis of celebrity-name embeddings (Yuan et al. 2023); "perfusion"
    # learns gated, key-locked rank-1 edits of cross-attention K/V and a concept embedding (Tewel et al. 2023).
    method: Literal[recipes.names()] = Field(  # type: ignore[valid-type]
        "lora", description="Personalisation recipe: " + "; ".join(f"'{n}': {r.doc}" for n, r in recipes.NAMES.items())
    )
    # Omitted from dumps while empty, so configs (and dataset recipes) from before it keep their fingerprint.
    recipe_options: dict[str, Any] = Field(
        default_factory=dict, exclude_if=lambda v: not v,
        description="Options of the chosen recipe, validated by its Options model (docs/RECIPES.md), e.g. "
        "celeb_basis: {\"names\": \"s3://bucket/names.txt\", \"placeholder\": \"sks\"}; LoRA recipes take none.",
    )
    # LoRA recipes only (lora, orthogonal, lora_fa); other recipes ignore them.
    # weights2weights uses rank 1: 99,648 values per SD 1.5 model, small enough for PCA over thousands.
    rank: int = Field(1, ge=1, description="LoRA rank r.")
    # weights2weights' alpha; the effective update is (alpha / rank) * B @ A.
    alpha: float = Field(27.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    # Self- and cross-attention query/value projections, as in weights2weights; the UNet only.
    target_modules: tuple[str, ...] = Field(
        ("to_q", "to_v"), min_length=1, description="Names of the UNet nn.Linear layers to adapt (suffix match)."
    )
    # -- optimisation (the rest: TrainingConfig) --------------------------------------------------------
    steps: int = Field(800, ge=1, description="Optimiser steps per row (weights2weights: 800).")
    # One instance image per step (plus as many class images with prior preservation), as weights2weights.
    images_per_step: int = Field(1, ge=1, description="Instance images per row per step (and as many class images).")
    # diffusers' DreamBooth-LoRA default, which weights2weights trained with.
    weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay.")
    # -- prior preservation --------------------------------------------------------------------------
    # Keeps the class ("person") from collapsing onto the identity; weights2weights trains with it.
    prior_preservation: bool = Field(True, description="Add the class-image loss (DreamBooth prior preservation).")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class-image loss.")
    # Shared by all rows with the same class prompt; generated once per base model and cached.
    num_class_images: int = Field(100, ge=1, description="Class images generated (or read from class_image_dir).")
    class_image_dir: str | None = Field(None, description="A folder URI of your own class images, instead of generating.")
    # The pipeline's usual sampler settings; only used when generating class images.
    class_inference_steps: int = Field(50, ge=1, description="Sampling steps per generated class image.")
    class_guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance for generated class images.")
    # -- data and reproducibility --------------------------------------------------------------------
    # None = the base's native size (sample_size x VAE factor: 512 for SD 1.5, 64 for the tiny model).
    resolution: int | None = Field(None, ge=8, description="Training resolution in pixels; default the base's own.")
    # The shared LoRA init and, with each row's id, the row's data order, timesteps and noise.
    seed: int = Field(0, ge=0, description="Seed of the shared adapter init and, with each row id, of its data order.")
    # -- execution (do not change results beyond float tolerance; pack, precision: TrainingConfig) ---------
    compile: bool = Field(False, description="torch.compile the UNet forward (slow first step, faster after).")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward to fit larger packs.")

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.class_image_dir is not None and not self.prior_preservation:
            raise ValueError("class_image_dir is set but prior_preservation is off")
        recipes.options(self.method, self.recipe_options)  # a recipe's options are checked with the config
        return self
