"""The ``edit-lora`` engine: one LoRA per editing concept on the image-to-image base, packed per step.

Same contract as ``tasks/identity/engine.py`` (``BatchResult`` of ``ItemResult``): rows in, one flat
vector per row (canonical ``Layout``: ``<conv>.lora_A.weight`` / ``.lora_B.weight``, peft's shapes), its
final L1 loss, or why it failed. Reading top to bottom:

1. each row's pairs (``pairs.concept_pairs``): files, or rendered on the shared source pool;
2. packs of ``config.pack`` rows (``open_edit_pack``): stacked adapters on the base's convs
   (``lora.packed``), one forward per step giving every row's L1 loss (``EditPack.losses``);
3. the shared batch driver (``tasks/finetune/driver.py``) does the rest, as for every engine: AdamW
   with warm-up, per-row clipping, NaN drops, OOM splits, flattening; the base is restored as it was.

**One shared init.** Every row's adapter starts from the same seeded A (peft's Kaiming-uniform) and
B = 0, and every row trains on the same sequence of source images. A LoRA's factors are only defined
up to an invertible r x r mix (B A = B M⁻¹ M A); starting all rows at one point and feeding them the
same data stream keeps their factors in one chart, so differences between rows are differences between
edits, and a mean, a PCA or a weight generator over rows is meaningful (weights2weights does the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from weightzoo.storage.layout import Layout
from weightzoo.tasks.concepts.base import SkipUNetGenerator
from weightzoo.tasks.concepts.config import EditFinetuneConfig
from weightzoo.tasks.concepts.lora import (
    PackedConvLoRA,
    adapted_convs,
    find_convs,
    packed,
    shared_fixed_a,
    shared_init,
)
from weightzoo.tasks.concepts.pairs import Pairs, psnr
from weightzoo.tasks.device import autocast
from weightzoo.tasks.finetune.driver import Observer, Pack, train_packs
from weightzoo.tasks.seeds import stable_seed


@dataclass
class ConceptRun:
    """One concept's training outcome at the lower level (the bench reads PSNR curves from it)."""

    weights: torch.Tensor | None  # float32 flat vector in layout order, None if it failed
    losses: list[float] = field(default_factory=list)
    psnr: list[tuple[int, float]] = field(default_factory=list)  # (steps done, mean held-out PSNR)
    failed: tuple[int, str] | None = None


def edit_layout(model: SkipUNetGenerator, config: EditFinetuneConfig) -> Layout:
    """The canonical layout of one concept's adapter on ``model`` (``edit-lora-fa``: A is a fixed tensor)."""
    sd, fixed = {}, []
    for n in find_convs(model, config.target_modules):
        conv = model.get_submodule(n)
        out, cin, kh, kw = conv.weight.shape
        if config.method == "edit-lora-fa":
            fixed.append(shared_fixed_a(n, conv, config.rank, config.seed))
        else:
            sd[f"{n}.lora_A.weight"] = torch.zeros(config.rank, cin, kh, kw)
        sd[f"{n}.lora_B.weight"] = torch.zeros(out, config.rank, 1, 1)
    return Layout.from_state_dict(sd, dtype=config.weights_dtype, fixed=fixed)


def _padded(batches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Concept-major stack of equal-sized batches (shorter ones repeat their last image); the size."""
    m = max(len(b) for b in batches)
    return torch.cat([torch.cat([b, b[-1:].expand(m - len(b), -1, -1, -1)]) for b in batches]), m


@torch.no_grad()
def _eval_psnr(model, pairs: Sequence[Pairs], device) -> list[float]:
    src, m = _padded([p.eval_src for p in pairs])
    out = model(src.to(device)).float().cpu()
    return [float(psnr(out[k * m : k * m + len(p.eval_src)], p.eval_tgt).mean()) for k, p in enumerate(pairs)]


class EditPack:
    """One pack of concept adapters in the base's convs, in the driver's terms (``driver.Pack``)."""

    def __init__(self, model: SkipUNetGenerator, pairs: Sequence[Pairs], config: EditFinetuneConfig, layout: Layout,
                 wrappers: dict[str, PackedConvLoRA]) -> None:
        self.model, self.pairs, self.config, self.layout = model, pairs, config, layout
        self.device = next(model.parameters()).device
        self.wrappers = {n: w.to(self.device) for n, w in wrappers.items()}
        fixed = layout.fixed_tensors()
        with torch.no_grad():
            for n, w in self.wrappers.items():  # the shared init: seeded A (or the layout's fixed A), B = 0
                key = f"{n}.lora_A.weight"
                w.A[:] = fixed[key] if key in fixed else shared_init(n, w.base, config.rank, config.seed)
                w.A.requires_grad_(key not in fixed)
                w.B.zero_()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trained tensors: A (unless the layout fixes it) and B of every adapted conv."""
        for w in self.wrappers.values():
            yield from (w.A, w.B) if w.A.requires_grad else (w.B,)

    def losses(self, step: int, active: list[int]) -> torch.Tensor:
        """Every concept's L1 loss on the step's pairs (one shared draw for all rows); the active ones."""
        c, k = self.config, len(self.pairs)
        g = torch.Generator().manual_seed(stable_seed(c.data_seed, "edit-batch", step))
        raw = torch.randint(0, 2**31 - 1, (c.pairs_per_step,), generator=g)
        src = torch.cat([p.train_src[raw % len(p.train_src)] for p in self.pairs]).to(self.device)
        tgt = torch.cat([p.train_tgt[raw % len(p.train_tgt)] for p in self.pairs]).to(self.device)
        with autocast(c.mixed_precision, self.device):
            out = self.model(src)
        return (out.float() - tgt).abs().view(k, -1).mean(1)[active]

    def flatten(self, slot: int) -> torch.Tensor:
        sd = {f"{n}.{key}": t.float().cpu() for n, w in self.wrappers.items() for key, t in w.factors(slot).items()}
        return self.layout.flatten(sd)

    def load(self, slot: int, vector: torch.Tensor | np.ndarray) -> None:
        sd = self.layout.unflatten(self.layout.as_tensor(vector).float())
        for n, w in self.wrappers.items():
            w.A[slot] = sd[f"{n}.lora_A.weight"].float()
            w.B[slot] = sd[f"{n}.lora_B.weight"].float()[..., 0, 0]

    def psnr(self) -> list[float]:
        """Each concept's mean held-out PSNR with its adapter as it is now."""
        return _eval_psnr(self.model, self.pairs, self.device)


@contextmanager
def open_edit_pack(model: SkipUNetGenerator, pairs: Sequence[Pairs], config: EditFinetuneConfig,
                   layout: Layout) -> Iterator[EditPack]:
    """K = len(pairs) adapters at the shared init in ``model``'s convs; the model is restored on exit."""
    with packed(model, adapted_convs(layout), len(pairs), config.rank, config.alpha / config.rank) as wrappers:
        yield EditPack(model, pairs, config, layout, wrappers)


def _psnr_observer(runs: list[ConceptRun], eval_every: int) -> Observer:
    """Record held-out PSNR at 0 and every ``eval_every`` steps (if > 0), and always when training ends."""
    def observe(done: int, pack: Pack, last: bool) -> None:
        due = eval_every and done % eval_every == 0
        if (due or last) and not (runs[0].psnr and runs[0].psnr[-1][0] == done):
            for run, value in zip(runs, pack.psnr(), strict=True):  # type: ignore[attr-defined]
                run.psnr.append((done, value))
    return observe


def train_concepts(model: SkipUNetGenerator, pairs: Sequence[Pairs], config: EditFinetuneConfig, layout: Layout,
                   inits: Sequence[torch.Tensor | np.ndarray | None] | None = None, *, eval_every: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> list[ConceptRun]:
    """Train one adapter per entry of ``pairs`` (in packs of ``config.pack``, through the batch driver);
    ``eval_every`` > 0 records held-out PSNR every so many steps (the final PSNR is always recorded)."""
    slots = [SimpleNamespace(id=str(i)) for i in range(len(pairs))]
    starts = {str(i): v for i, v in enumerate(inits or []) if v is not None}
    runs = [ConceptRun(None) for _ in pairs]
    whole = config.model_copy(update={"pack": max(1, len(pairs))})  # one pack: the observer sees every concept
    results = train_packs(lambda rows: open_edit_pack(model, [pairs[int(r.id)] for r in rows], config, layout),
                          slots, whole, progress=progress, init_weights=starts, observe=_psnr_observer(runs, eval_every))
    for run, res in zip(runs, results, strict=True):
        run.losses = res.loss_history
        run.weights = None if res.weights is None else res.weights.float()
        run.failed = None if res.ok else (res.steps, res.reason or "")
    return runs
