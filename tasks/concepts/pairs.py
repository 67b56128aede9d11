"""A concept's image pairs: training pairs and held-out pairs (for PSNR), from files or rendered.

A procedural row (no images) is rendered on the shared source pool: every row sees the *same* source
images in the same order, so two concepts' LoRAs differ only by what their edits do — not by which
photos they happened to draw. A row of files uses its own pairs; the last ``eval_pairs`` are held out.
Sources without targets are rendered with the row's spec.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from weightzoo.tasks.concepts.rows import edit_pairs
from weightzoo.tasks.concepts.sources import source_images, to_tensor
from weightzoo.tasks.concepts.spec import EditSpec
from weightzoo.tasks.finetune.images import load_image
from weightzoo.tasks.finetune.row import ManifestRow
from weightzoo.tasks.seeds import stable_seed


@dataclass(frozen=True)
class Pairs:
    """(n, 3, H, W) float sources and targets in [0, 1]: ``train_*`` to fit, ``eval_*`` to measure PSNR."""

    train_src: torch.Tensor
    train_tgt: torch.Tensor
    eval_src: torch.Tensor
    eval_tgt: torch.Tensor


@functools.lru_cache(maxsize=8)
def shared_sources(n: int, size: int, data_seed: int) -> torch.Tensor:
    """The pool every procedural concept is rendered on (cached: the same for every row of a batch)."""
    return source_images(n, size, stable_seed(data_seed, "concept-sources"))


def concept_pairs(row: ManifestRow, base_uri: str | None, *, train: int, held_out: int, size: int,
                  data_seed: int) -> Pairs:
    """The row's pairs at ``size`` px; raises if its images cannot be read or there are too few pairs."""
    files = edit_pairs(row, base_uri)
    if not files:
        src = shared_sources(train + held_out, size, data_seed)
        tgt = EditSpec.parse(row.attributes).apply(src)
        return Pairs(src[:train], tgt[:train], src[train:], tgt[train:])
    if len(files) < 2:
        raise ValueError(f"row {row.id!r} has {len(files)} image pair(s); at least 2 are needed (1 held out)")
    src = torch.stack([to_tensor(load_image(s), size) for s, _ in files])
    given = [t for _, t in files]
    if all(t is not None for t in given):
        tgt = torch.stack([to_tensor(load_image(t), size) for t in given])  # type: ignore[arg-type]
    else:
        tgt = EditSpec.parse(row.attributes).apply(src)
    k = min(held_out, max(1, len(files) // 4))
    return Pairs(src[:-k], tgt[:-k], src[-k:], tgt[-k:])


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (n, 3, H, W) images in [0, 1] (predictions clamped to [0, 1])."""
    mse = (pred.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))
