"""The recipe contract: what the diffusers engine (``engine.py``) asks of a personalisation method.

A recipe is one way to personalise a base text-to-image model (LoRA, Orthogonal Adaptation, Celeb
Basis, ...). It declares which tensors it trains (their shapes become the dataset's ``Layout``, so a
row *is* the recipe's learned tensors), injects K independent copies of them into one loaded base
(``attach``: a pack trains in one forward/backward), and exports a row as a file that diffusers (or
the recipe's documented loader) applies to the base. Everything else is the engine's (inputs, per-row
randomness, losses) or the shared batch driver's (``driver.py``: AdamW and schedule, per-row clipping,
NaN handling, OOM splitting) and identical for every recipe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from weightzoo.storage.layout import Layout
from weightzoo.tasks.identity import recipes

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from pydantic import BaseModel

    from weightzoo.tasks.finetune.row import ManifestRow
    from weightzoo.tasks.identity.config import FinetuneConfig


class Adapters(Protocol):
    """K independent copies of a recipe's trainable tensors, live in the base model while the ``with`` lasts.

    Slot k is row k of the pack. ``condition`` may rewrite the UNet's text conditioning of the active
    rows' samples (a recipe that learns word embeddings does; weight recipes return ``ehs`` as is).
    """

    def __enter__(self) -> Adapters: ...
    def __exit__(self, *exc: object) -> None: ...
    def parameters(self) -> Iterator[nn.Parameter]: ...
    def set_active(self, slots: list[int] | None) -> None: ...
    def load_slot(self, slot: int, state_dict: dict[str, torch.Tensor]) -> None: ...
    def state_dict_for(self, slot: int) -> dict[str, torch.Tensor]: ...
    def condition(self, ehs: torch.Tensor, active: torch.Tensor) -> torch.Tensor: ...


class Recipe(ABC):
    """One personalisation method. Subclasses set ``name``; its doc line, options model and family are
    its entry in the torch-free name registry (``recipes.NAMES``), read by ``--help`` without this code."""

    name: str

    @property
    def doc(self) -> str:
        return recipes.entry(self.name).doc

    @property
    def lora_family(self) -> bool:
        return recipes.entry(self.name).lora_family

    def options(self, config: FinetuneConfig) -> BaseModel:
        """``config.recipe_options`` validated by this recipe's options model."""
        return recipes.options(self.name, config.recipe_options)

    @abstractmethod
    def layout(self, pipe: StableDiffusionPipeline, config: FinetuneConfig) -> Layout:
        """The row layout on ``pipe`` (from shapes only, nothing trained)."""

    def prepare(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
                cache_dir: str | None) -> Any:
        """Once per batch, before any pack: whatever ``attach`` needs (fitted bases, tokenised prompts)."""
        return None

    @abstractmethod
    def attach(self, pipe: StableDiffusionPipeline, config: FinetuneConfig, rows: Sequence[ManifestRow],
               prepared: Any) -> Adapters:
        """K = len(rows) fresh adapters, every one at the recipe's shared seeded init."""

    def hparams(self, config: FinetuneConfig, prepared: Any) -> dict:
        """What a row records beyond the config (resolved options, where a fitted basis is cached)."""
        return {}

    @abstractmethod
    def export(self, weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict, out: str) -> str:
        """Write one row as the recipe's loadable file; returns its URI."""
