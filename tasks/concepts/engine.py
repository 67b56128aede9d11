"""The ``edit-lora`` engine: one LoRA per editing concept on the image-to-image base, packed per step.

Same contract as ``tasks/finetune/engine.py`` (``BatchResult`` of ``ItemResult``): rows in, one flat
vector per row (canonical ``Layout``: ``<conv>.lora_A.weight`` / ``.lora_B.weight``, peft's shapes), its
final L1 loss, or why it failed. Reading top to bottom:

1. each row's pairs (``pairs.concept_pairs``): files, or rendered on the shared source pool;
2. packs of ``config.pack`` rows: stacked adapters on the base's convs (``lora.packed``), one
   forward/backward per step, per-row L1 loss, per-row gradient clipping, AdamW;
3. flatten each surviving adapter; the base is restored exactly as it was.

**One shared init.** Every row's adapter starts from the same seeded A (peft's Kaiming-uniform) and
B = 0, and every row trains on the same sequence of source images. A LoRA's factors are only defined
up to an invertible r x r mix (B A = B M⁻¹ M A); starting all rows at one point and feeding them the
same data stream keeps their factors in one chart, so differences between rows are differences between
edits, and a mean, a PCA or a weight generator over rows is meaningful (weights2weights does the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from weightzoo.storage.layout import Layout
from weightzoo.tasks.concepts.base import SkipUNetGenerator
from weightzoo.tasks.concepts.lora import find_convs, packed, shared_init
from weightzoo.tasks.concepts.pairs import Pairs, psnr
from weightzoo.tasks.seeds import stable_seed

ALL_CONVS = ("inc", "down1", "down2", "mid", "up2", "up1", "outc")


class EditFinetuneConfig(BaseModel):
    """How to fine-tune each editing concept (saved with every row)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Fields that change speed or reporting, not the weights: not part of a dataset's recipe (storage/card.py).
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"pack", "check_every", "loss_window"})

    # First, so flows can take `FinetuneConfig | EditFinetuneConfig` discriminated on `method`.
    method: Literal["edit-lora"] = Field("edit-lora", description="Adapter method: LoRA on the edit base's convs.")
    # Rank 2 on every conv: ~7.7k values per concept on the default base, small enough for thousands of rows.
    rank: int = Field(2, ge=1, description="LoRA rank r.")
    # alpha = rank: scale 1, so learning rates do not depend on the rank.
    alpha: float = Field(2.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    # Every conv: colour edits live in the 1x1-like mixing of the outer layers, spatial ones in the inner.
    target_modules: tuple[str, ...] = Field(ALL_CONVS, min_length=1, description="Names of the base's convs to adapt.")
    # 100 steps at lr 5e-3 reach a plateau for single edits on the default base (docs/CONCEPTS.md).
    steps: int = Field(100, ge=1, description="Optimiser steps per concept.")
    batch_size: int = Field(4, ge=1, description="Image pairs per concept per step.")
    learning_rate: float = Field(5e-3, gt=0, description="AdamW learning rate (constant).")
    # torch's default. A larger epsilon (1e-3, 1e-2) makes rows smoother in the edit (a coordinate with a tiny
    # gradient then barely moves instead of stepping ~lr·sign(g)), but slows fine-tuning more than it helps a
    # weight generator: docs/BENCHMARKS.md, "Concept zoo" and "Edit LoRA rows".
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    # No decay: it would pull every row toward zero by an amount that depends on the steps, not the edit.
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    # Per row (never across a pack), so packing cannot change a row's update.
    max_grad_norm: float | None = Field(1.0, gt=0, description="Per-row gradient-norm clip; None disables it.")
    # 16 + 8 pairs: enough variety that a LoRA learns the edit, not the photos; 8 measure it.
    train_pairs: int = Field(16, ge=1, description="Training pairs per concept (rendered rows; files use theirs).")
    eval_pairs: int = Field(8, ge=1, description="Held-out pairs per concept, for PSNR.")
    image_size: int | None = Field(None, ge=8, description="Training size in pixels; default the base's own.")
    # One seed for the shared adapter init; one for the source pool and the batch order (shared by all rows).
    seed: int = Field(0, ge=0, description="Seed of the shared adapter init (the same for every row).")
    data_seed: int = Field(0, ge=0, description="Seed of the shared source images and of every step's pair choice.")
    loss_window: int = Field(10, ge=1, description="Steps averaged for the reported final loss.")
    # -- execution (does not change results beyond float tolerance) --------------------------------
    pack: int = Field(16, ge=1, description="Concepts trained together in one step (1 = sequential).")
    # Rows are small (thousands of values): float32 keeps them exact.
    weights_dtype: Literal["float16", "bfloat16", "float32"] = Field("float32", description="Storage dtype of the rows.")
    check_every: int = Field(10, ge=1, description="Steps between NaN checks and progress reports.")


@dataclass
class ConceptRun:
    """One concept's training outcome at the lower level (the bench reads PSNR curves from it)."""

    weights: torch.Tensor | None  # float32 flat vector in layout order, None if it failed
    losses: list[float] = field(default_factory=list)
    psnr: list[tuple[int, float]] = field(default_factory=list)  # (steps done, mean held-out PSNR)
    failed: tuple[int, str] | None = None


def edit_layout(model: SkipUNetGenerator, config: EditFinetuneConfig) -> Layout:
    """The canonical layout of one concept's adapter on ``model``."""
    sd = {}
    for n in find_convs(model, config.target_modules):
        out, cin, kh, kw = model.get_submodule(n).weight.shape
        sd[f"{n}.lora_A.weight"] = torch.zeros(config.rank, cin, kh, kw)
        sd[f"{n}.lora_B.weight"] = torch.zeros(out, config.rank, 1, 1)
    return Layout.from_state_dict(sd, dtype=config.weights_dtype)


def _load_slot(wrappers, slot: int, layout: Layout, vector, config: EditFinetuneConfig) -> None:
    with torch.no_grad():
        if vector is None:
            for n, w in wrappers.items():
                w.A[slot] = shared_init(n, w.base, config.rank, config.seed)
                w.B[slot] = 0
            return
        sd = layout.unflatten(layout.as_tensor(vector if isinstance(vector, torch.Tensor) else np.asarray(vector)).float())
        for n, w in wrappers.items():
            w.A[slot] = sd[f"{n}.lora_A.weight"].float()
            w.B[slot] = sd[f"{n}.lora_B.weight"].float()[..., 0, 0]


def _clip(wrappers, max_norm: float) -> None:
    """Clip each row's gradient to ``max_norm`` (as torch's clip_grad_norm_ would on that row alone)."""
    params = [p for w in wrappers.values() for p in (w.A, w.B)]
    sq = sum(p.grad.flatten(1).pow(2).sum(1) for p in params)
    factor = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(factor.view(-1, *([1] * (p.grad.ndim - 1))))


def _padded(batches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Concept-major stack of equal-sized batches (shorter ones repeat their last image); the size."""
    m = max(len(b) for b in batches)
    return torch.cat([torch.cat([b, b[-1:].expand(m - len(b), -1, -1, -1)]) for b in batches]), m


@torch.no_grad()
def _eval_psnr(model, pairs: Sequence[Pairs], device) -> list[float]:
    src, m = _padded([p.eval_src for p in pairs])
    out = model(src.to(device)).float().cpu()
    return [float(psnr(out[k * m : k * m + len(p.eval_src)], p.eval_tgt).mean()) for k, p in enumerate(pairs)]


def train_concepts(model: SkipUNetGenerator, pairs: Sequence[Pairs], config: EditFinetuneConfig, layout: Layout,
                   inits: Sequence[torch.Tensor | np.ndarray | None] | None = None, *, eval_every: int = 0,
                   progress: Callable[[int], None] | None = None) -> list[ConceptRun]:
    """Train one adapter per entry of ``pairs`` in one pack; ``eval_every`` > 0 records held-out PSNR."""
    k, c = len(pairs), config
    device = next(model.parameters()).device
    names = [key[: -len(".lora_A.weight")] for key in layout.keys if key.endswith(".lora_A.weight")]
    runs = [ConceptRun(None) for _ in range(k)]
    with packed(model, names, k, c.rank, c.alpha / c.rank) as wrappers:
        wrappers = {n: w.to(device) for n, w in wrappers.items()}
        for slot in range(k):
            _load_slot(wrappers, slot, layout, (inits or [None] * k)[slot], c)
        params = [p for w in wrappers.values() for p in (w.A, w.B)]
        opt = torch.optim.AdamW(params, lr=c.learning_rate, eps=c.adam_epsilon, weight_decay=c.weight_decay)
        active = list(range(k))
        if eval_every:
            for r, v in zip(runs, _eval_psnr(model, pairs, device), strict=True):
                r.psnr.append((0, v))
        for step in range(c.steps):
            g = torch.Generator().manual_seed(stable_seed(c.data_seed, "edit-batch", step))
            raw = torch.randint(0, 2**31 - 1, (c.batch_size,), generator=g)
            src = torch.cat([p.train_src[raw % len(p.train_src)] for p in pairs]).to(device)
            tgt = torch.cat([p.train_tgt[raw % len(p.train_tgt)] for p in pairs]).to(device)
            per = (model(src) - tgt).abs().view(k, -1).mean(1)
            per[active].sum().backward()
            if c.max_grad_norm is not None:
                _clip(wrappers, c.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for i, v in enumerate(per.detach().cpu().tolist()):
                runs[i].losses.append(v)
            if (step + 1) % c.check_every == 0 or step + 1 == c.steps:
                for i in [i for i in active if not np.isfinite(runs[i].losses[-c.check_every:]).all()]:
                    runs[i].failed, active = (step + 1, f"loss not finite at step {step + 1}"), [a for a in active if a != i]
                if progress is not None:
                    progress(step + 1)
                if not active:
                    break
            if eval_every and (step + 1) % eval_every == 0:
                for i, v in enumerate(_eval_psnr(model, pairs, device)):
                    runs[i].psnr.append((step + 1, v))
        if not runs or not runs[0].psnr or runs[0].psnr[-1][0] != len(runs[0].losses):
            for i, v in enumerate(_eval_psnr(model, pairs, device)):
                runs[i].psnr.append((len(runs[i].losses), v))
        for i in active:
            sd = {f"{n}.{key}": t for n, w in wrappers.items() for key, t in w.factors(i).items()}
            runs[i].weights = layout.flatten({key: v.float().cpu() for key, v in sd.items()}).float()
    return runs
