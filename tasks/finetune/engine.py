"""The fine-tune engine: one LoRA per manifest row, several rows packed into each training step.

``finetune_batch`` takes a loaded pipeline and a list of rows and returns, per row, the flattened
LoRA (canonical ``Layout``), its final loss and timing, or a recorded failure. Reading top to bottom:

1. inputs, once per batch: VAE latents of each row's images, one text embedding per distinct prompt,
   shared prior-preservation class latents (generated once per base model, cached on disk);
2. packs of ``config.pack`` rows: the method's recipe (``recipes/``: LoRA, orthogonal, Celeb Basis, Perfusion)
   injects K stacked adapters into the base, one forward/backward per step for the whole pack, per-row
   loss, per-row gradient clipping, AdamW;
3. flatten each surviving adapter with the layout; the pipeline is restored exactly as it was.

Everything random about a row (image order, timesteps, noise) comes from its own generator seeded by
``seed`` and the row's id, and every adapter starts from the same ``seed``-derived init. So a row
trains to the same weights whether it is packed with others or alone (``pack=1``), within float
tolerance; ``tests/test_finetune.py`` checks this.

Defaults follow weights2weights (Dravid et al. 2024): rank 1, alpha 27, ``to_q``/``to_v`` of every
UNet attention, 800 steps, batch 1, lr 1e-4 constant, AdamW, prior preservation with "person".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from weightzoo.storage.layout import Layout
from weightzoo.tasks.device import autocast, use_bf16
from weightzoo.tasks.finetune import recipes
from weightzoo.tasks.finetune.class_images import class_latents, encode_images
from weightzoo.tasks.finetune.manifest import ManifestRow, load_images
from weightzoo.tasks.finetune.recipes.base import Adapters, Recipe
from weightzoo.tasks.finetune.recipes.lora import LoRARecipe
from weightzoo.tasks.finetune.recipes.lora import lora_layout as lora_layout
from weightzoo.tasks.seeds import stable_seed


class FinetuneConfig(BaseModel):
    """How to fine-tune each row: method, hyperparameters and execution knobs (saved with every row)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Fields that change how fast a row trains or what is reported, not its weights (beyond float
    # tolerance): a dataset's recipe (storage/card.py) ignores them, so a rerun may change them freely.
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"pack", "mixed_precision", "compile", "gradient_checkpointing", "check_every", "loss_window"}
    )

    # -- method ------------------------------------------------------------------------------------
    # A registered recipe (tasks/finetune/recipes/, docs/RECIPES.md): "lora" trains A and B; "orthogonal"
    # fixes A to id-derived orthogonal rows (Po et al. 2024) so models can be summed; "celeb_basis" learns
    # word-embedding coefficients over a basis of celebrity-name embeddings (Yuan et al. 2023); "perfusion"
    # learns gated, key-locked rank-1 edits of cross-attention K/V and a concept embedding (Tewel et al. 2023).
    method: Literal[recipes.names()] = Field(  # type: ignore[valid-type]
        "lora", description="Personalisation recipe: " + "; ".join(f"'{n}': {r.doc}" for n, r in recipes.RECIPES.items())
    )
    # Omitted from dumps while empty, so configs (and dataset recipes) from before it keep their fingerprint.
    recipe_options: dict[str, Any] = Field(
        default_factory=dict, exclude_if=lambda v: not v,
        description="Options of the chosen recipe, validated by its Options model (docs/RECIPES.md), e.g. "
        "celeb_basis: {\"names\": \"s3://bucket/names.txt\", \"placeholder\": \"sks\"}; LoRA recipes take none.",
    )
    # LoRA recipes only (lora, orthogonal); other recipes ignore them.
    # weights2weights uses rank 1: 99,648 values per SD 1.5 model, small enough for PCA over thousands.
    rank: int = Field(1, ge=1, description="LoRA rank r.")
    # weights2weights' alpha; the effective update is (alpha / rank) * B @ A.
    alpha: float = Field(27.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    # Self- and cross-attention query/value projections, as in weights2weights; the UNet only.
    target_modules: tuple[str, ...] = Field(
        ("to_q", "to_v"), min_length=1, description="Names of the UNet nn.Linear layers to adapt (suffix match)."
    )
    # -- optimisation --------------------------------------------------------------------------------
    steps: int = Field(800, ge=1, description="Optimiser steps per row (weights2weights: 800).")
    # One instance image per step (plus as many class images with prior preservation), as weights2weights.
    batch_size: int = Field(1, ge=1, description="Instance images per row per step (and as many class images).")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (constant after warm-up).")
    # 0 = constant schedule, as weights2weights; a warm-up helps at high learning rates.
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the constant learning rate.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    # diffusers' DreamBooth-LoRA default, which weights2weights trained with.
    weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay.")
    # Clipped per row (never across a pack), so packing cannot change a row's update.
    max_grad_norm: float | None = Field(1.0, gt=0, description="Per-row gradient-norm clip; None disables it.")
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
    # One seed for the shared LoRA init (every model starts from the same point, as PCA over the
    # dataset assumes) and, with each row's id, for its data order, timesteps and noise.
    seed: int = Field(0, ge=0, description="Seed of the shared adapter init and, with each row id, of its data order.")
    # Final loss = mean of this many last steps: one step's loss depends heavily on its timestep.
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
    compile: bool = Field(False, description="torch.compile the UNet forward (slow first step, faster after).")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward to fit larger packs.")
    # Reading losses back forces a device sync; every few steps keeps the GPU queue full.
    check_every: int = Field(10, ge=1, description="Steps between NaN checks and progress reports.")

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.class_image_dir is not None and not self.prior_preservation:
            raise ValueError("class_image_dir is set but prior_preservation is off")
        recipes.get(self.method).options(self)  # a recipe's options are checked with the config
        return self


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


@dataclass
class BatchResult:
    layout: Layout
    results: list[ItemResult]
    hparams: dict  # the resolved config, stored with every row


# -- methods -----------------------------------------------------------------------------------------

# The LoRA-family recipes by name, each with ``init_a(name, layer, ids, config)`` and ``train_a`` (kept
# for callers that rebuild a LoRA's shared init). Every recipe: ``recipes.RECIPES``.
METHODS: dict[str, LoRARecipe] = {n: r for n, r in recipes.RECIPES.items() if isinstance(r, LoRARecipe)}


# -- layout and config resolution --------------------------------------------------------------------


def default_resolution(pipe: StableDiffusionPipeline) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def resolved_hparams(pipe: StableDiffusionPipeline, config: FinetuneConfig) -> dict:
    """The config with defaults resolved against ``pipe``: what a row records about how it was made."""
    device = pipe.unet.device
    return config.model_dump(mode="json") | {
        "resolution": config.resolution or default_resolution(pipe),
        "mixed_precision": "bf16" if use_bf16(config.mixed_precision, device) else "no",
        "scale": config.alpha / config.rank,
        "latents": "vae-posterior-mean",
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
    }


# -- inputs, computed once per batch -------------------------------------------------------------------


def instance_latents(
    pipe: StableDiffusionPipeline, row: ManifestRow, images: list[Image.Image], resolution: int
) -> torch.Tensor:
    """Latents (n, C, h, w) of one row's decoded images: encoded once, read by every step."""
    return encode_images(pipe, images, resolution)


@torch.no_grad()
def encode_prompt(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    """The (1, L, D) text embedding the UNet is conditioned on (one prompt per call: exact, order-free)."""
    tok = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0].float()


@dataclass
class _Run:
    """Everything shared by the packs of one batch: model, cached inputs, schedule, progress."""

    pipe: StableDiffusionPipeline
    config: FinetuneConfig
    recipe: Recipe
    prepared: Any  # the recipe's per-batch state (target names, a fitted basis, tokenised prompts)
    latents: dict[str, torch.Tensor]
    embeds: dict[str, torch.Tensor]
    class_latents: dict[str, torch.Tensor]
    scheduler: DDPMScheduler
    forward: Callable
    layout: Layout
    total_steps: int
    progress: Callable[[int, int], None] | None
    init_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    done: int = 0

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total_steps)


@contextmanager
def _training_mode(unet: nn.Module, config: FinetuneConfig) -> Iterator[None]:
    """Freeze the UNet for adapter training and restore flags, mode and checkpointing afterwards."""
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    was_training, was_ckpt = unet.training, bool(getattr(unet, "is_gradient_checkpointing", False))
    unet.requires_grad_(False)
    unet.train()
    if config.gradient_checkpointing and not was_ckpt:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if config.gradient_checkpointing and not was_ckpt:
            unet.disable_gradient_checkpointing()
        unet.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


# -- one pack ------------------------------------------------------------------------------------------


def _epoch_order(g: torch.Generator, n: int, count: int) -> torch.Tensor:
    """``count`` indices into n items, as successive shuffled epochs (every image seen once per epoch)."""
    parts = [torch.randperm(n, generator=g) for _ in range(math.ceil(count / n))]
    return torch.cat(parts)[:count]


@dataclass
class _Stream:
    """A row's random choices, from its own generators: identical whatever pack it trains in."""

    sample_index: torch.Tensor  # (steps, S) indices into the row's instance latents, then class latents
    timesteps: torch.Tensor  # (steps, S)
    noise: torch.Generator

    @classmethod
    def for_row(cls, row_id: str, n_images: int, n_class: int, run: _Run) -> _Stream:
        c = run.config
        g = torch.Generator().manual_seed(stable_seed(c.seed, "data", row_id))
        idx = _epoch_order(g, n_images, c.steps * c.batch_size).view(c.steps, c.batch_size)
        if c.prior_preservation:
            cls_idx = _epoch_order(g, n_class, c.steps * c.batch_size).view(c.steps, c.batch_size)
            idx = torch.cat([idx, cls_idx + n_images], dim=1)
        t = torch.randint(0, run.scheduler.config.num_train_timesteps, idx.shape, generator=g)
        return cls(idx, t, torch.Generator().manual_seed(stable_seed(c.seed, "noise", row_id)))


@dataclass
class _PackInputs:
    """A pack's inputs on the device: one pool of latents, and per-step tables of which sample each row reads.

    ``index``/``timesteps`` are (steps, K, S): row k's S samples at each step (its b instance images,
    then b class images). Laying samples out row-major is what lets the packed layers use one bmm.
    """

    pool: torch.Tensor  # (n, C, h, w): every row's instance latents, then its class latents
    index: torch.Tensor  # (steps, K, S) into pool
    timesteps: torch.Tensor  # (steps, K, S)
    noise: list[torch.Generator]  # one per row, on CPU: the same draws on any device
    ehs: torch.Tensor  # (K, S, L, D) text embedding of each sample

    @classmethod
    def build(cls, run: _Run, rows: list[ManifestRow]) -> _PackInputs:
        c, device, dtype = run.config, run.device, run.pipe.unet.dtype
        b = c.batch_size
        pool, index, timesteps, noise, ehs = [], [], [], [], []
        offset = 0
        for row in rows:
            inst = run.latents[row.id]
            cls_lat = run.class_latents[row.class_prompt] if c.prior_preservation else inst[:0]
            stream = _Stream.for_row(row.id, len(inst), len(cls_lat), run)
            pool += [inst, cls_lat]
            index.append(stream.sample_index + offset)
            timesteps.append(stream.timesteps)
            noise.append(stream.noise)
            offset += len(inst) + len(cls_lat)
            prompts = [row.prompt] * b + [row.class_prompt] * (stream.sample_index.shape[1] - b)
            ehs.append(torch.cat([run.embeds[p] for p in prompts]))
        return cls(torch.cat(pool).to(device), torch.stack(index, 1).to(device), torch.stack(timesteps, 1).to(device),
                   noise, torch.stack(ehs).to(device, dtype))

    def batch(self, step: int, active: list[int], act_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Latents, noise, timesteps and embeddings of one step for the ``active`` rows, row-major."""
        s_per = self.index.shape[2]
        latents = self.pool.index_select(0, self.index[step, act_t].flatten())
        shape = (s_per, *self.pool.shape[1:])
        noise = torch.cat([torch.randn(shape, generator=self.noise[i]) for i in active]).to(self.pool.device)
        return latents, noise, self.timesteps[step, act_t].flatten(), self.ehs[act_t].flatten(0, 1)


def _row_losses(run: _Run, inputs: _PackInputs, step: int, active: list[int], act_t: torch.Tensor,
                adapters: Adapters) -> torch.Tensor:
    """One forward of the pack: each active row's loss (instance + weighted prior), shape (m,)."""
    c, unet, sched = run.config, run.pipe.unet, run.scheduler
    latents, noise, t, ehs = inputs.batch(step, active, act_t)
    ehs = adapters.condition(ehs, act_t)
    noisy = sched.add_noise(latents, noise, t)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    with autocast(c.mixed_precision, run.device):
        pred = run.forward(noisy.to(unet.dtype), t, encoder_hidden_states=ehs, return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    per_sample = per_sample.view(len(active), -1)
    b = c.batch_size
    loss = per_sample[:, :b].mean(1)
    if c.prior_preservation:
        loss = loss + c.prior_loss_weight * per_sample[:, b:].mean(1)
    return loss


def _drop_nonfinite(losses: torch.Tensor, since: int, active: list[int], failed: dict[int, tuple[int, str]]) -> None:
    """Move rows whose loss went NaN/inf since step ``since`` from ``active`` to ``failed`` (reads back one window)."""
    window = losses[since:].cpu()
    for slot in list(active):
        bad = (~torch.isfinite(window[:, slot])).nonzero()
        if len(bad):
            at = since + int(bad[0])
            failed[slot] = (at + 1, f"non-finite loss ({float(losses[at, slot])}) at step {at + 1}")
            active.remove(slot)


def _train_pack(run: _Run, rows: list[ManifestRow]) -> list[ItemResult]:
    """Train ``rows`` together, one adapter each; a diverging row is dropped, the others go on."""
    c, k, device = run.config, len(rows), run.device
    started, done_before = time.perf_counter(), run.done
    inputs = _PackInputs.build(run, rows)
    losses = torch.full((c.steps, k), float("nan"), device=device)
    active, failed, last_check = list(range(k)), {}, 0
    act_t = torch.arange(k, device=device)
    with run.recipe.attach(run.pipe, c, rows, run.prepared) as packed:
        with torch.no_grad():
            for slot, row in enumerate(rows):
                if row.id in run.init_weights:  # start from given weights (e.g. generated ones) instead
                    packed.load_slot(slot, run.layout.unflatten(run.layout.as_tensor(run.init_weights[row.id]).float()))
        opt = torch.optim.AdamW(list(packed.parameters()), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                eps=c.adam_epsilon, weight_decay=c.weight_decay)
        warm = c.lr_warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        for step in range(c.steps):
            row_loss = _row_losses(run, inputs, step, active, act_t, packed)
            row_loss.sum().backward()  # a plain sum: each adapter's gradient is exactly its own row's
            if c.max_grad_norm is not None:
                packed.clip_grad_norm_(c.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses[step, act_t] = row_loss.detach()
            if (step + 1) % c.check_every == 0 or step + 1 == c.steps:
                _drop_nonfinite(losses[: step + 1], last_check, active, failed)
                last_check = step + 1
                run.done = done_before + sum(step + 1 if i in active else c.steps for i in range(k))
                run.report()
                if not active:
                    break
                if len(active) != len(act_t):
                    packed.set_active(active)
                    act_t = torch.tensor(active, device=device)
        seconds = (time.perf_counter() - started) / k
        return [_result(run, row, slot, packed, losses[:, slot].tolist(), failed.get(slot), seconds)
                for slot, row in enumerate(rows)]


def _result(run: _Run, row: ManifestRow, slot: int, packed: Adapters, history: list[float],
            failure: tuple[int, str] | None, seconds: float) -> ItemResult:
    """A row's outcome: its flattened adapter and final loss, or why it failed."""
    c = run.config
    if failure is not None:
        at, reason = failure
        return ItemResult(row.id, False, None, None, at, seconds, reason, history[:at])
    flat = run.layout.flatten(packed.state_dict_for(slot))
    if not torch.isfinite(flat).all():
        reason = f"weights not finite in {c.weights_dtype} after training"
        return ItemResult(row.id, False, None, None, c.steps, seconds, reason, history)
    tail = history[-c.loss_window :]
    return ItemResult(row.id, True, flat, sum(tail) / len(tail), c.steps, seconds, None, history)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _train_with_retry(run: _Run, rows: list[ManifestRow]) -> list[ItemResult]:
    """Train a pack; on out-of-memory, split it in halves and retry each; a single row that OOMs fails."""
    done_before = run.done
    try:
        return _train_pack(run, rows)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # Outside the except block, so the traceback's references to activations are gone before retrying.
    run.done = done_before
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    if len(rows) == 1:
        run.done += run.config.steps
        run.report()
        return [ItemResult(rows[0].id, False, None, None, 0, 0.0, f"out of memory at pack size 1: {message}")]
    half = (len(rows) + 1) // 2
    return _train_with_retry(run, rows[:half]) + _train_with_retry(run, rows[half:])


# -- the batch's inputs, once -------------------------------------------------------------------------


@dataclass
class BatchInputs:
    """Everything a batch trains from, computed once before any step: VAE latents per row, one text
    embedding per distinct prompt, class latents per class prompt; rows whose images fail are failures."""

    latents: dict[str, torch.Tensor]
    embeds: dict[str, torch.Tensor]
    class_latents: dict[str, torch.Tensor]
    failures: dict[str, ItemResult]
    seconds: dict[str, float]  # each row's own preparation plus its share of the shared work


def _row_latents(pipe: StableDiffusionPipeline, items: list[ManifestRow], resolution: int,
                 base_uri: str | None, out: BatchInputs) -> None:
    for row in items:
        t0 = time.perf_counter()
        try:
            images = load_images(row, base_uri)
        except Exception as exc:  # any failure to read or decode a row's images is that row's failure
            out.failures[row.id] = ItemResult(row.id, False, None, None, 0, time.perf_counter() - t0,
                                              f"images: {type(exc).__name__}: {exc}")
            continue
        out.latents[row.id] = instance_latents(pipe, row, images, resolution)
        out.seconds[row.id] = time.perf_counter() - t0


def prepare_inputs(pipe: StableDiffusionPipeline, items: list[ManifestRow], config: FinetuneConfig, *,
                   base_uri: str | None = None, cache_dir: str | None = None) -> BatchInputs:
    """Encode a batch's images and prompts once (and generate or read its class latents once)."""
    resolution = config.resolution or default_resolution(pipe)
    out = BatchInputs({}, {}, {}, {}, {})
    _row_latents(pipe, items, resolution, base_uri, out)
    rows = [r for r in items if r.id in out.latents]
    t0 = time.perf_counter()
    classes = sorted({r.class_prompt for r in rows}) if config.prior_preservation else []
    out.embeds = {p: encode_prompt(pipe, p) for p in sorted({r.prompt for r in rows} | set(classes))}
    for cp in classes:
        out.class_latents[cp] = class_latents(
            pipe, cp, n=config.num_class_images, resolution=resolution, steps=config.class_inference_steps,
            guidance=config.class_guidance_scale, seed=config.seed, folder=config.class_image_dir,
            cache_dir=cache_dir,
        )
    shared = (time.perf_counter() - t0) / max(1, len(rows))
    out.seconds = {i: s + shared for i, s in out.seconds.items()}
    return out


# -- the batch -----------------------------------------------------------------------------------------


def finetune_batch(
    pipe: StableDiffusionPipeline,
    items: list[ManifestRow],
    config: FinetuneConfig,
    *,
    base_uri: str | None = None,
    cache_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    init_weights: Mapping[str, torch.Tensor | np.ndarray] | None = None,
) -> BatchResult:
    """Fine-tune one adapter per row of ``items`` on ``pipe`` (left exactly as it was passed in).

    ``init_weights``: item id → flat vector in this config's layout to start that item from (a
    generated or previously trained adapter) instead of the shared init; other items are unaffected.

    ``base_uri``: the manifest's folder, for relative image paths. ``cache_dir``: where class latents
    are cached across batches (any fsspec URI; None = regenerate per call). ``progress(done, total)``
    counts row-steps. Failures of single rows (undecodable images, NaN/inf loss, out of memory even
    alone) are returned as ``ItemResult(ok=False, reason=...)``; anything else raises.
    """
    ids = [r.id for r in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate ids in batch: {sorted({i for i in ids if ids.count(i) > 1})}")
    inputs = prepare_inputs(pipe, items, config, base_uri=base_uri, cache_dir=cache_dir)
    results: dict[str, ItemResult] = dict(inputs.failures)
    rows = [r for r in items if r.id in inputs.latents]
    unet = pipe.unet
    recipe = recipes.get(config.method)
    prepared = recipe.prepare(pipe, config, rows, cache_dir)
    run = _Run(
        pipe=pipe, config=config, recipe=recipe, prepared=prepared,
        latents=inputs.latents, embeds=inputs.embeds, class_latents=inputs.class_latents,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        forward=torch.compile(unet) if config.compile else unet, layout=recipe.layout(pipe, config),
        total_steps=len(rows) * config.steps, progress=progress, init_weights=dict(init_weights or {}),
    )
    with _training_mode(unet, config):
        for i in range(0, len(rows), config.pack):
            for res in _train_with_retry(run, rows[i : i + config.pack]):
                res.seconds += inputs.seconds[res.id]
                results[res.id] = res
    hparams = resolved_hparams(pipe, config) | recipe.hparams(config, prepared)
    return BatchResult(run.layout, [results[i] for i in ids], hparams)

