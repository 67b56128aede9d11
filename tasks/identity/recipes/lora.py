"""LoRA and Orthogonal Adaptation: a low-rank update ``(alpha / r) · B A`` of chosen UNet linear layers.

Trainable tensors: per target layer of the family's denoiser (UNet or transformer, ``denoise.denoiser``) ``<module>.lora_A.weight`` (r, in) and ``<module>.lora_B.weight``
(out, r), in peft/diffusers names (the row layout). ``lora`` trains A and B from a shared Gaussian A
(std 1/r, seeded per layer) and B = 0; ``orthogonal`` (Po et al. 2024, "Orthogonal Adaptation for
Modular Customization of Diffusion Models") fixes A to a block of r rows of one seeded orthogonal basis
per layer, the block picked by the row's id, and trains B only: two rows with different blocks have
A_i A_jᵀ = 0, so summing their updates (``weightzoo merge``) leaves each one's update intact on its
own inputs. ``lora_fa`` (LoRA-FA, Zhang et al. 2023; HyperDreamBooth's fixed basis) fixes A to the first r
rows of one seeded orthogonal basis per layer, *the same for every row*, scaled to the row norm of
``lora``'s init, and trains B only: the layout records A as a fixed tensor (seed, scale), so a row stores
only B and ΔW = B·A is linear in the row (averaging rows averages updates). All export as a diffusers
LoRA (``export.export_lora``); ``Layout.unflatten`` puts the fixed A back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from weightzoo.storage.layout import FixedTensor, Layout
from weightzoo.tasks.finetune.export import export_lora
from weightzoo.tasks.finetune.packed_lora import PackedLoRA, find_targets
from weightzoo.tasks.identity.denoise import denoiser
from weightzoo.tasks.identity.recipes.base import Recipe
from weightzoo.tasks.seeds import stable_seed

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from weightzoo.tasks.finetune.row import ManifestRow
    from weightzoo.tasks.identity.config import FinetuneConfig


class PackedLoRAAdapters(PackedLoRA):
    """``PackedLoRA`` as recipe adapters: a weight update, so the text conditioning is left alone."""

    def condition(self, ehs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return ehs


def shared_a(name: str, fan_in: int, config: FinetuneConfig) -> FixedTensor:
    """``lora_fa``'s frozen A of layer ``name``: r orthonormal rows from a per-layer seed, scaled to
    sqrt(in)/r, the expected row norm of the Gaussian init (std 1/r), so B learns at ``lora``'s pace."""
    if fan_in < config.rank:
        raise ValueError(f"{name}: rank {config.rank} exceeds its input size {fan_in}")
    return FixedTensor(f"{name}.lora_A.weight", (config.rank, fan_in), stable_seed(config.seed, "lora-fa", name),
                       math.sqrt(fan_in) / config.rank)


def lora_layout(pipe: StableDiffusionPipeline, config: FinetuneConfig, fixed_a: bool = False) -> Layout:
    """The layout ``config`` produces on ``pipe``'s UNet, without training (shapes from the module tree);
    ``fixed_a``: every A is a fixed tensor of the layout (``shared_a``), rows store B only."""
    shapes: dict[str, torch.Tensor] = {}
    fixed: list[FixedTensor] = []
    model = denoiser(pipe)
    for name in find_targets(model, config.target_modules):
        layer = model.get_submodule(name)
        if fixed_a:
            fixed.append(shared_a(name, layer.in_features, config))
        else:
            shapes[f"{name}.lora_A.weight"] = torch.empty(config.rank, layer.in_features, device="meta")
        shapes[f"{name}.lora_B.weight"] = torch.empty(layer.out_features, config.rank, device="meta")
    return Layout.from_state_dict(shapes, dtype=config.weights_dtype, fixed=fixed)


def gaussian_init(name: str, layer: nn.Linear, ids: list[str], config: FinetuneConfig) -> torch.Tensor:
    """Gaussian A with std 1/r (peft's "gaussian" init, as diffusers' DreamBooth script), the same for every row."""
    g = torch.Generator().manual_seed(stable_seed(config.seed, "lora-init", name))
    a = torch.randn(config.rank, layer.in_features, generator=g) / config.rank
    return a.expand(len(ids), -1, -1).clone()


def orthogonal_init(name: str, layer: nn.Linear, ids: list[str], config: FinetuneConfig) -> torch.Tensor:
    """Rows of one random orthogonal basis per layer (from ``seed``); each row id picks a block of r rows.

    Two models whose blocks differ have A_i A_j^T = 0 exactly, so their summed updates do not interfere.
    The block is ``hash(id) mod (in // r)``: ids collide with probability r/in per layer (1/320 for
    SD 1.5's smallest layers at rank 1), as in the paper's random assignment.
    """
    fan_in, r = layer.in_features, config.rank
    if fan_in < r:
        raise ValueError(f"{name}: rank {r} exceeds its input size {fan_in}")
    g = torch.Generator().manual_seed(stable_seed(config.seed, "orthogonal-basis", name))
    basis = torch.linalg.qr(torch.randn(fan_in, fan_in, generator=g, dtype=torch.float64)).Q.T.float()
    blocks = fan_in // r
    return torch.stack([basis[(b := stable_seed("orthogonal-block", i) % blocks) * r : b * r + r] for i in ids])


def fa_init(name: str, layer: nn.Linear, ids: list[str], config: FinetuneConfig) -> torch.Tensor:
    """``lora_fa``'s A: the layout's fixed tensor (``shared_a``), the same for every row."""
    return shared_a(name, layer.in_features, config).build().expand(len(ids), -1, -1).clone()


class LoRARecipe(Recipe):
    """A LoRA whose down-projection A starts at ``init_a`` and trains only if ``train_a``; ``fixed_a``: A is
    a fixed tensor of the layout (not stored in rows)."""

    def __init__(self, name: str, train_a: bool,
                 init_a: Callable[[str, nn.Linear, list[str], FinetuneConfig], torch.Tensor],
                 fixed_a: bool = False) -> None:
        self.name, self.train_a, self.init_a, self.fixed_a = name, train_a, init_a, fixed_a

    def layout(self, pipe: StableDiffusionPipeline, config: FinetuneConfig) -> Layout:
        return lora_layout(pipe, config, self.fixed_a)

    def prepare(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
                cache_dir: str | None) -> list[str]:
        self.options(config)  # refuses options: a LoRA recipe has none
        return find_targets(denoiser(pipe), config.target_modules)

    def attach(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
               prepared: Any) -> PackedLoRAAdapters:
        ids = [r.id for r in rows]
        return PackedLoRAAdapters(denoiser(pipe), prepared, len(rows), config.rank, config.alpha / config.rank,
                                  lambda name, layer: self.init_a(name, layer, ids, config), self.train_a)

    def export(self, weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict, out: str) -> str:
        return export_lora(weights, layout, hparams, out)


RECIPES = (LoRARecipe("lora", True, gaussian_init), LoRARecipe("orthogonal", False, orthogonal_init),
           LoRARecipe("lora_fa", False, fa_init, fixed_a=True))
