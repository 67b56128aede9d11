"""The fine-tune engine: one LoRA per manifest row, several rows packed into each training step.

``prepare`` (the engine's entry in ``engines.py``) turns a loaded pipeline and a list of rows into the
shared driver's batch; ``finetune_batch`` runs it through the driver and returns, per row, the flattened
LoRA (canonical ``Layout``), its final loss and timing, or a recorded failure. Reading top to bottom:

1. inputs, once per batch: VAE latents of each row's images, one text embedding per distinct prompt,
   shared prior-preservation class latents (generated once per base model, cached on disk);
2. packs of ``config.pack`` rows (``_open_pack``): the method's recipe (``recipes/``: LoRA, orthogonal,
   Celeb Basis, Perfusion) injects K stacked adapters into the base, and ``_row_losses`` gives every
   row's loss of one forward for the whole pack;
3. the shared batch driver (``driver.py``) does the rest, as for every engine: AdamW, per-row clipping,
   NaN drops, OOM splits, flattening; the pipeline is restored exactly as it was.

Everything random about a row (image order, timesteps, noise) comes from its own generator seeded by
``seed`` and the row's id, and every adapter starts from the same ``seed``-derived init. So a row
trains to the same weights whether it is packed with others or alone (``pack=1``), within float
tolerance; ``tests/test_finetune.py`` checks this.

Defaults follow weights2weights (Dravid et al. 2024): rank 1, alpha 27, ``to_q``/``to_v`` of every
UNet attention, 800 steps, one image per step, lr 1e-4 constant, AdamW, prior preservation with "person".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from weightzoo.errors import InputError
from weightzoo.storage.layout import Layout
from weightzoo.tasks.device import autocast, use_bf16
from weightzoo.tasks.finetune.contract import BatchResult, ItemResult
from weightzoo.tasks.finetune.driver import Prepared, prepare_rows, train_batch
from weightzoo.tasks.finetune.images import load_images
from weightzoo.tasks.finetune.row import ManifestRow
from weightzoo.tasks.identity import recipes
from weightzoo.tasks.identity.class_images import class_latents, encode_images
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.denoise import (
    Cond,
    Objective,
    default_resolution,
    denoiser,
    encode_sd_prompt,
    objective,
)
from weightzoo.tasks.identity.families import detect_pipeline
from weightzoo.tasks.identity.recipes.base import Adapters, Recipe
from weightzoo.tasks.identity.recipes.lora import LoRARecipe
from weightzoo.tasks.seeds import stable_seed

# -- methods -----------------------------------------------------------------------------------------

# The LoRA-family recipes by name, each with ``init_a(name, layer, ids, config)`` and ``train_a`` (kept
# for callers that rebuild a LoRA's shared init). Every recipe: ``recipes.NAMES``.
METHODS: dict[str, LoRARecipe] = {n: r for n in recipes.names() if isinstance(r := recipes.get(n), LoRARecipe)}


# -- layout and config resolution --------------------------------------------------------------------


def resolved_hparams(pipe: Any, config: FinetuneConfig) -> dict:
    """The config with defaults resolved against ``pipe``: what a row records about how it was made,
    including its model family (which also keys the export's prefix and the objective)."""
    device = denoiser(pipe).device
    out = config.model_dump(mode="json") | {
        "resolution": config.resolution or default_resolution(pipe),
        "mixed_precision": "bf16" if use_bf16(config.mixed_precision, device) else "no",
        "scale": config.alpha / config.rank,
        "latents": "vae-posterior-mean",
    }
    family = detect_pipeline(pipe)
    if family.objective == "ddpm":
        out["prediction_type"] = pipe.scheduler.config.get("prediction_type", "epsilon")
    return out | {"family": family.name}


# -- inputs, computed once per batch -------------------------------------------------------------------


def instance_latents(
    pipe: Any, row: ManifestRow, images: list[Image.Image], resolution: int
) -> torch.Tensor:
    """Latents (n, C, h, w) of one row's decoded images: encoded once, read by every step."""
    return encode_images(pipe, images, resolution)


encode_prompt = encode_sd_prompt  # SD 1.x/2.x's text embedding (the subspace's inversion conditions on it)


@dataclass
class _Batch:
    """Everything shared by the packs of one batch: model, cached inputs, the recipe's state, schedule."""

    pipe: Any
    config: FinetuneConfig
    recipe: Recipe
    prepared: Any  # the recipe's per-batch state (target names, a fitted basis, tokenised prompts)
    inputs: BatchInputs
    objective: Objective  # the family's conditioning, timestep draw and loss (denoise.py)
    forward: Callable
    layout: Layout

    @property
    def device(self) -> torch.device:
        return denoiser(self.pipe).device


@contextmanager
def _training_mode(unet: nn.Module, config: FinetuneConfig) -> Iterator[None]:
    """Freeze the denoiser (UNet or transformer) for adapter training and restore flags, mode and checkpointing afterwards."""
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
    timesteps: torch.Tensor  # (steps, S): the objective's timestep indices
    noise: torch.Generator

    @classmethod
    def for_row(cls, row_id: str, n_images: int, n_class: int, run: _Batch) -> _Stream:
        c = run.config
        g = torch.Generator().manual_seed(stable_seed(c.seed, "data", row_id))
        idx = _epoch_order(g, n_images, c.steps * c.images_per_step).view(c.steps, c.images_per_step)
        if c.prior_preservation:
            cls_idx = _epoch_order(g, n_class, c.steps * c.images_per_step).view(c.steps, c.images_per_step)
            idx = torch.cat([idx, cls_idx + n_images], dim=1)
        t = run.objective.draw(g, tuple(idx.shape))
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
    texts: torch.Tensor  # (n,): which text of ``cond`` conditions each pool entry (its caption, prompt or class)
    cond: Cond  # name -> (T, ...): the pack's distinct texts' conditioning (embeddings, pooled, time ids)

    @classmethod
    def build(cls, run: _Batch, rows: list[ManifestRow]) -> _PackInputs:
        c, device = run.config, run.device
        pool, index, timesteps, noise, texts = [], [], [], [], []
        table: dict[str, int] = {}
        offset = 0
        for row in rows:
            inst = run.inputs.latents[row.id]
            cls_lat = run.inputs.class_latents[row.class_prompt] if c.prior_preservation else inst[:0]
            stream = _Stream.for_row(row.id, len(inst), len(cls_lat), run)
            pool += [inst, cls_lat]
            index.append(stream.sample_index + offset)
            timesteps.append(stream.timesteps)
            noise.append(stream.noise)
            offset += len(inst) + len(cls_lat)
            texts += [table.setdefault(t, len(table)) for t in image_texts(row, len(inst))]
            if len(cls_lat):
                texts += [table.setdefault(row.class_prompt, len(table))] * len(cls_lat)
        embeds = [run.inputs.embeds[t] for t in table]
        cond = {k: torch.cat([e[k] for e in embeds]).to(device) for k in embeds[0]}
        return cls(torch.cat(pool).to(device), torch.stack(index, 1).to(device), torch.stack(timesteps, 1).to(device),
                   noise, torch.tensor(texts, device=device), cond)

    def batch(self, step: int, active: list[int], act_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cond]:
        """Latents, noise, timestep indices and conditioning of one step for the ``active`` rows, row-major:
        each sample is conditioned on its own image's text (its caption, or the row's prompt)."""
        s_per = self.index.shape[2]
        picked = self.index[step, act_t].flatten()
        latents = self.pool.index_select(0, picked)
        shape = (s_per, *self.pool.shape[1:])
        noise = torch.cat([torch.randn(shape, generator=self.noise[i]) for i in active]).to(self.pool.device)
        which = self.texts.index_select(0, picked)
        return latents, noise, self.timesteps[step, act_t].flatten(), {k: v.index_select(0, which) for k, v in self.cond.items()}


def image_texts(row: ManifestRow, n_images: int) -> list[str]:
    """The text each of a row's images trains with: its caption, with the row's prompt (the instance token)
    put first where the caption lacks it, as kohya's ``keep_tokens`` keeps the trigger; else the prompt."""
    if not row.captions:
        return [row.prompt] * n_images
    return [c if row.prompt in c else f"{row.prompt}, {c}" for c in row.captions]


def _row_losses(run: _Batch, inputs: _PackInputs, step: int, active: list[int], act_t: torch.Tensor,
                adapters: Adapters) -> torch.Tensor:
    """One forward of the pack: each active row's loss (instance + weighted prior), shape (m,)."""
    c = run.config
    latents, noise, t, cond = inputs.batch(step, active, act_t)
    cond["encoder_hidden_states"] = adapters.condition(cond["encoder_hidden_states"], act_t)
    per_sample = run.objective.losses(run.forward, latents, noise, t, cond,
                                      lambda: autocast(c.mixed_precision, run.device))
    per_sample = per_sample.view(len(active), -1)
    b = c.images_per_step
    loss = per_sample[:, :b].mean(1)
    if c.prior_preservation:
        loss = loss + c.prior_loss_weight * per_sample[:, b:].mean(1)
    return loss


class _SDPack:
    """One pack's adapters in the UNet, in the driver's terms (``driver.Pack``)."""

    def __init__(self, run: _Batch, inputs: _PackInputs, adapters: Adapters) -> None:
        self.run, self.inputs, self.adapters = run, inputs, adapters
        self.active = list(range(inputs.index.shape[1]))
        self.act_t = torch.arange(len(self.active), device=run.device)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.adapters.parameters()

    def losses(self, step: int, active: list[int]) -> torch.Tensor:
        if active != self.active:  # rows dropped: the packed layers skip their groups from now on
            self.active = list(active)
            self.adapters.set_active(self.active)
            self.act_t = torch.tensor(self.active, device=self.run.device)
        return _row_losses(self.run, self.inputs, step, self.active, self.act_t, self.adapters)

    def flatten(self, slot: int) -> torch.Tensor:
        return self.run.layout.flatten(self.adapters.state_dict_for(slot))

    def load(self, slot: int, vector: torch.Tensor | np.ndarray) -> None:
        layout = self.run.layout
        self.adapters.load_slot(slot, layout.unflatten(layout.as_tensor(vector).float()))


@contextmanager
def _open_pack(run: _Batch, rows: list[ManifestRow]) -> Iterator[_SDPack]:
    """K fresh adapters of the recipe in the (frozen, training-mode) denoiser; all restored on exit."""
    inputs = _PackInputs.build(run, rows)
    with _training_mode(denoiser(run.pipe), run.config), run.recipe.attach(run.pipe, run.config, rows, run.prepared) as a:
        yield _SDPack(run, inputs, a)


# -- the batch's inputs, once -------------------------------------------------------------------------


@dataclass
class BatchInputs:
    """Everything a batch trains from, computed once before any step: VAE latents per row, one text
    embedding per distinct prompt, class latents per class prompt; rows whose images fail are failures."""

    latents: dict[str, torch.Tensor]
    embeds: dict[str, Cond]  # prompt -> its conditioning (the family's tensors, each (1, ...))
    class_latents: dict[str, torch.Tensor]
    failures: dict[str, ItemResult]
    seconds: dict[str, float]  # each row's own preparation plus its share of the shared work


def prepare_inputs(pipe: Any, items: list[ManifestRow], config: FinetuneConfig, *,
                   base_uri: str | None = None, cache_dir: str | None = None,
                   objective_: Objective | None = None) -> BatchInputs:
    """Encode a batch's images and prompts once (and generate or read its class latents once)."""
    resolution = config.resolution or default_resolution(pipe)
    objective_ = objective_ or objective(pipe, resolution)
    latents, failures, seconds = prepare_rows(
        items, lambda row: instance_latents(pipe, row, load_images(row, base_uri), resolution), "images")
    out = BatchInputs(latents, {}, {}, failures, seconds)
    rows = [r for r in items if r.id in out.latents]
    t0 = time.perf_counter()
    classes = sorted({r.class_prompt for r in rows}) if config.prior_preservation else []
    texts = {t for r in rows for t in image_texts(r, len(out.latents[r.id]))}
    out.embeds = {p: objective_.encode(p) for p in sorted(texts | set(classes))}
    for cp in classes:
        out.class_latents[cp] = class_latents(
            pipe, cp, n=config.num_class_images, resolution=resolution, steps=config.class_inference_steps,
            guidance=config.class_guidance_scale, seed=config.seed, folder=config.class_image_dir,
            cache_dir=cache_dir,
        )
    shared = (time.perf_counter() - t0) / max(1, len(rows))
    out.seconds = {i: s + shared for i, s in out.seconds.items()}
    return out


def prepare(pipe: Any, items: list[ManifestRow], config: FinetuneConfig, *,
            base_uri: str | None = None, cache_dir: str | None = None) -> Prepared:
    """The engine's ``prepare``, the driver's view of a batch: inputs encoded once, the recipe prepared,
    packs to open. ``base_uri``: the manifest's folder, for relative image paths; ``cache_dir``: where
    class latents are cached across batches (any fsspec URI; None = regenerate per call)."""
    recipe = recipes.get(config.method)
    family = detect_pipeline(pipe)
    if not recipe.lora_family and family.name != "sd":
        raise InputError(f"method {config.method!r} trains SD 1.x/2.x bases only; this base is {family.name} "
                         "(use a LoRA method: lora, orthogonal, lora_fa)")
    goal = objective(pipe, config.resolution or default_resolution(pipe))
    inputs = prepare_inputs(pipe, items, config, base_uri=base_uri, cache_dir=cache_dir, objective_=goal)
    rows = [r for r in items if r.id in inputs.latents]
    prepared = recipe.prepare(pipe, config, rows, cache_dir)
    model = denoiser(pipe)
    run = _Batch(pipe=pipe, config=config, recipe=recipe, prepared=prepared, inputs=inputs, objective=goal,
                 forward=torch.compile(model) if config.compile else model, layout=recipe.layout(pipe, config))
    hparams = resolved_hparams(pipe, config) | goal.hparams() | recipe.hparams(config, prepared)
    return Prepared(lambda pack: _open_pack(run, pack), run.layout, hparams, inputs.failures, inputs.seconds)


# -- the batch -----------------------------------------------------------------------------------------


def finetune_batch(
    pipe: Any,
    items: list[ManifestRow],
    config: FinetuneConfig,
    *,
    base_uri: str | None = None,
    cache_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    init_weights: Mapping[str, torch.Tensor | np.ndarray] | None = None,
) -> BatchResult:
    """Fine-tune one adapter per row of ``items`` on ``pipe`` (left exactly as it was passed in): the
    one-call form for tests and benches (a build runs the driver on ``prepare`` itself, ``batch.py``).

    ``init_weights``: item id → flat vector in this config's layout to start that item from (a
    generated or previously trained adapter) instead of the shared init; other items are unaffected.

    ``base_uri``: the manifest's folder, for relative image paths. ``cache_dir``: where class latents
    are cached across batches (any fsspec URI; None = regenerate per call). ``progress(done, total)``
    counts row-steps. Failures of single rows (undecodable images, NaN/inf loss, out of memory even
    alone) are returned as ``ItemResult(ok=False, reason=...)``; anything else raises.
    """
    return train_batch(items, config, lambda rows: prepare(pipe, rows, config, base_uri=base_uri, cache_dir=cache_dir),
                       progress=progress, init_weights=init_weights)
