"""``WeightDiffusionConfig`` (a weight-diffusion run) and the denoiser's user-chosen size, free of torch:
the CLI builds ``train-diffusion``'s flags from them and the flows' config names them, without importing
the generator.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The text a row is conditioned on: its prompt, or its prompt then its attributes as 'key value' pairs.
Condition = Literal["prompt", "prompt+attributes"]


class DenoiserSize(BaseModel):
    """The denoiser's size, as a user chooses it (a weight-diffusion run's config inherits these fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Small on purpose: datasets have tens to thousands of models, each one training example.
    width: int = Field(128, ge=8, description="Denoiser transformer width.")
    depth: int = Field(3, ge=1, description="Denoiser transformer layers (self-attention, cross-attention, MLP).")
    heads: int = Field(4, ge=1, description="Denoiser attention heads.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the denoiser's attention and MLP.")


class WeightDiffusionConfig(DenoiserSize):
    """Everything that defines a weight-diffusion training run (the flow's form; saved as config.json).
    The denoiser's size fields (width, depth, heads, dropout) come from ``DenoiserSize``."""

    dataset: str = Field(description="Dataset URI (local path or s3://...) of fine-tuned rows.")
    base: str = Field(description="The base model URI: its tokenizer and text encoder embed the condition.")
    out: str = Field(description="Model folder URI (created; a rerun resumes from its last checkpoint).")
    # -- data ----------------------------------------------------------------------------------------
    # 256 values per token: SD 1.5's 99,648-value rank-1 LoRA becomes 390 tokens, the tiny model's ~20.
    block_size: int = Field(256, ge=1, description="Values per block; the last block is zero-padded and masked.")
    # Synthetic subjects all share "sks person"; their attributes are what tells them apart.
    condition: Condition | Literal["structured"] = Field(
        "prompt+attributes", description="Text condition: 'prompt' or 'prompt+attributes' (prompt, then 'key value' "
        "pairs); or 'structured': attributes as numbers and one-hots (no text encoder; `base` is not read).",
    )
    # 0: the plain generator (the conditional mean of the rows). k > 0: retrieval + a learnt correction,
    # which before training is exactly the k-nearest interpolation (tasks/diffusion/retrieval.py).
    residual_k: int = Field(0, ge=0, description="Generate retrieval + correction: the k nearest training rows by "
                            "condition, inverse-distance weighted, plus a denoised correction (0: plain generator).")
    # 'svd': every LoRA row re-expressed by its layers' SVD (tasks/finetune/gauge.py) before statistics, retrieval
    # and targets, so rows of nearby edits are nearby rows; generated rows are then in that form too.
    form: Literal["rows", "svd"] = Field("rows", description="Rows as stored ('rows'), or each LoRA layer's ΔW "
                                         "re-expressed by SVD as B = U·√S, A = √S·Vᵀ ('svd': no gauge freedom).")
    stats: str | None = Field(None, description="A subspace.safetensors with mean/std to reuse; default: computed on the training rows.")
    holdout_ids: tuple[str, ...] = Field((), description="Ids never trained on (kept for evaluation).")
    holdout_fraction: float = Field(0.0, ge=0, lt=1, description="Fraction of ids held out at random (with split_seed).")
    split_seed: int = Field(0, ge=0, description="Seed of the random held-out choice.")
    # -- optimisation -------------------------------------------------------------------------------
    steps: int = Field(2000, ge=1, description="Optimiser steps (total, including any resumed ones).")
    batch_size: int = Field(32, ge=1, description="Models per step (drawn with replacement).")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate, after a linear warm-up.")
    lr_warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    seed: int = Field(0, ge=0, description="Seed of the init and of every step's batch, timesteps and noise.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (one is always written at the end).")
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    # bf16 autocast on CUDA: the attention and MLP matmuls run at tensor-core speed; weights stay fp32.
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="'auto': bf16 autocast on CUDA only.")
    # -- objective ------------------------------------------------------------------------------------
    # 'task': each step's predicted rows also run through the frozen base on the workload's own examples
    # (tasks/diffusion/objective.py; the dataset's engine must offer a task loss: edit-lora does).
    objective: Literal["weights", "task"] = Field(
        "weights", description="'weights': learn the stored rows; 'task': also score the predicted rows on the "
        "workload's examples through the frozen base (the weight loss stays, as a regulariser).",
    )
    # 10: the L1 edit loss is ~0.1-0.2 next to a weight MSE of ~0.5; at 1 it barely moved generated rows, at 10 it
    # cut their held-out edit L1 from 0.160 to 0.139 (24 concepts, 300 steps; docs/WEIGHT_DIFFUSION.md).
    task_weight: float = Field(10.0, ge=0, description="Weight of the task loss next to the weight loss (objective 'task').")
    task_pairs: int = Field(2, ge=1, description="Examples per row per step for the task loss (objective 'task').")
    # What the concept-zoo bench counts is steps to a target from the start, not the start's own loss: score the
    # rows after a few steps of their own fine-tune (first-order, as Reptile/FOMAML: the gradient at the moved
    # rows is applied to the start).
    inner_steps: int = Field(0, ge=0, description="Objective 'task': score the rows after this many simulated Adam "
                             "steps of the rows' own fine-tune from the generated start (0: the start itself).")
    inner_lr: float | None = Field(None, gt=0, description="Learning rate of those simulated steps (default: the "
                                   "rows' own fine-tune learning rate).")
