"""The generator's task objective: predicted rows scored by the workload itself, not only against stored rows.

A weight loss alone teaches the denoiser the stored rows; where two concepts close in condition have
rows far apart, it learns their average, which may do neither job. With ``objective="task"`` every step
also turns the denoiser's x0 prediction back into rows (``BlockSpec.reassemble``, ``Stats.denormalise``)
and asks the dataset's engine how well those rows do their row's job: the edit engine applies them as
LoRAs to its frozen base and scores the edit on the concept's image pairs (Text-to-LoRA's finding:
task-trained hypernetworks generalise where reconstruction-trained ones do not). The weight loss stays,
as a regulariser; ``task_weight`` sets the balance.

Workload-agnostic: the engine (``contract.Engine.task_loss``) knows the examples and the base; this
module knows only rows. A dataset whose engine offers no task loss (identities) is refused before
anything is trained or written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from weightzoo.errors import InputError
from weightzoo.storage.card import read_card
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.fs import join
from weightzoo.storage.tensors import load_tensors
from weightzoo.tasks.diffusion.blocks import BlockSpec, Stats
from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
from weightzoo.tasks.seeds import stable_seed


class TaskLoss(Protocol):
    """An engine's score of rows (lower is better): ``ids`` name each row's examples, ``rows`` (n, D) float
    are the rows in layout order, ``generator`` draws the examples (seeded by the caller, so a resumed run
    draws the same ones). Returns a scalar, differentiable in ``rows``."""

    def __call__(self, ids: Sequence[str], rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


def engine_task_loss(config: WeightDiffusionConfig, ds: Dataset, device: torch.device) -> TaskLoss | None:
    """The dataset engine's task loss on ``config.base`` for objective 'task' (None for 'weights').

    Refused in one line when the dataset names no engine, its engine makes no examples, or ``config.base``
    is not the base its rows were trained on (the card's fingerprint): scores through another base mean nothing.
    """
    if config.objective != "task":
        return None
    from weightzoo.tasks.finetune import engines

    card = read_card(ds.ledger)
    if card is None:
        raise InputError(f"objective 'task' needs the engine that built the rows; {ds.uri} has no dataset card naming "
                         "one (use objective 'weights')")
    engine = engines.get(card.engine)
    if engine.task_loss is None:
        raise InputError(f"objective 'task': engine {card.engine!r} of {ds.uri} offers no task loss "
                         "(use objective 'weights')")
    if engine.fingerprint(config.base) != card.base_model:
        raise InputError(f"objective 'task' scores rows through the base they were trained on; {config.base} is not "
                         f"that base (fingerprint {engine.fingerprint(config.base)} ≠ {card.base_model})")
    return engine.task_loss(config.base, ds, device, config.task_pairs)


@dataclass(frozen=True)
class TaskObjective:
    """``task_weight`` × the task loss of a batch's predicted rows, from the denoiser's normalised blocks."""

    loss: TaskLoss
    spec: BlockSpec
    stats: Stats  # on the training device
    ids: list[str]  # training ids, in the order of the denoiser's training blocks
    weight: float
    seed: int
    residual: tuple[torch.Tensor, torch.Tensor] | None = None  # a residual generator: (LOO retrievals, scale)

    @classmethod
    def bind(cls, loss: TaskLoss, config: WeightDiffusionConfig, spec: BlockSpec, ids: Sequence[str],
             device: torch.device, residual: tuple[torch.Tensor, torch.Tensor] | None = None) -> TaskObjective:
        """The objective of a prepared run: its statistics are those in the model folder (first run or resumed).
        ``residual``: the predictions are scaled residuals of these standardised retrievals (``residual_k``)."""
        saved = load_tensors(join(config.out, "stats.safetensors"))
        stats = Stats(saved["mean"].to(device), saved["std"].to(device))
        res = None if residual is None else (residual[0].to(device), residual[1].to(device))
        return cls(loss, spec, stats, list(ids), config.task_weight, config.seed, res)

    def __call__(self, pred: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
        """The weighted task loss of x0 predictions ``pred`` (n, B, S) for training rows ``idx`` at ``step``."""
        z = self.spec.reassemble(pred.float())
        if self.residual is not None:
            near, scale = self.residual
            z = near[idx] + z * scale
        rows = self.stats.denormalise(z)
        g = torch.Generator().manual_seed(stable_seed(self.seed, "task", step))
        return self.weight * self.loss([self.ids[i] for i in idx.tolist()], rows, g)
