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

With ``inner_steps`` n > 0 the rows are scored after n simulated steps of their own fine-tune (Adam with the
rows' recipe, ``InnerAdam``) from the generated start, and that loss's gradient is applied to the start
(first-order, as Reptile and FOMAML): the bench counts steps to a target from the start, and a start that
scores well at step 0 need not be one that fine-tunes fast. It costs n + 1 task losses per step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from weightzoo.errors import InputError
from weightzoo.storage.card import read_card
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.fs import filesystem, join
from weightzoo.storage.tensors import load_tensors
from weightzoo.tasks.diffusion.blocks import BlockSpec, RowForm, Stats
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
class InnerAdam:
    """``steps`` steps of the rows' own optimiser (Adam, a fresh state per row, the recipe's warm-up) from a
    start: what a fine-tune from that start does first. Each row's gradient is its own loss's (the batch
    loss times the number of rows), so a row moves as it would trained alone."""

    steps: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup: int = 0

    @classmethod
    def of(cls, config: WeightDiffusionConfig, hparams: dict) -> InnerAdam | None:
        """The simulated steps of ``config`` (None for ``inner_steps`` 0), with the rows' recipe ``hparams``."""
        if not config.inner_steps:
            return None
        lr = config.inner_lr or hparams.get("learning_rate")
        if lr is None:
            raise InputError("inner_steps needs inner_lr: the dataset's rows record no learning_rate")
        return cls(config.inner_steps, float(lr), (hparams.get("adam_beta1", 0.9), hparams.get("adam_beta2", 0.999)),
                   hparams.get("adam_epsilon", 1e-8), hparams.get("lr_warmup_steps", 0))

    def run(self, loss: TaskLoss, ids: Sequence[str], rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The rows after the steps (detached: first-order, no gradient through the steps); torch's Adam moves them."""
        x = rows.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr, betas=self.betas, eps=self.eps)
        for k in range(1, self.steps + 1):
            opt.param_groups[0]["lr"] = self.lr * (min(1.0, k / self.warmup) if self.warmup else 1.0)
            (x.grad,) = torch.autograd.grad(loss(ids, x, generator) * len(ids), x)
            opt.step()
        return x.detach()


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
    inner: InnerAdam | None = None  # score the rows after these simulated fine-tune steps
    form: RowForm | None = None  # the form ``generate`` returns rows in: the simulated steps start from it

    @classmethod
    def bind(cls, loss: TaskLoss, config: WeightDiffusionConfig, spec: BlockSpec, ids: Sequence[str],
             device: torch.device, residual: tuple[torch.Tensor, torch.Tensor] | None = None,
             form: RowForm | None = None) -> TaskObjective:
        """The objective of a prepared run: its statistics are those in the model folder (first run or resumed).
        ``residual``: the predictions are scaled residuals of these standardised retrievals (``residual_k``)."""
        saved = load_tensors(join(config.out, "stats.safetensors"))
        stats = Stats(saved["mean"].to(device), saved["std"].to(device))
        res = None if residual is None else (residual[0].to(device), residual[1].to(device))
        fs, path = filesystem(join(config.out, "hparams.json"))
        hparams = json.loads(fs.cat_file(path))
        return cls(loss, spec, stats, list(ids), config.task_weight, config.seed, res, InnerAdam.of(config, hparams),
                   form)

    def __call__(self, pred: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
        """The weighted task loss of x0 predictions ``pred`` (n, B, S) for training rows ``idx`` at ``step``."""
        z = self.spec.reassemble(pred.float())
        if self.residual is not None:
            near, scale = self.residual
            z = near[idx] + z * scale
        rows = self.stats.denormalise(z)
        g = torch.Generator().manual_seed(stable_seed(self.seed, "task", step))
        ids = [self.ids[i] for i in idx.tolist()]
        if self.inner is not None:  # first-order: the loss (and its gradient) at the moved rows, applied to the start
            start = rows.detach() if self.form is None else self.form(rows.detach())
            rows = rows + (self.inner.run(self.loss, ids, start, g) - rows).detach()
        return self.weight * self.loss(ids, rows, g)
