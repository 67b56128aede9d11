"""The batch driver every engine runs: rows in, one ``ItemResult`` per row out, in the order given.

An engine supplies two things (``Prepared``): its inputs, made once per batch (a row whose inputs fail
is that row's failure, with the reason), and ``open_pack(rows)``, which attaches K fresh adapters at
the shared init and gives a ``Pack``: the stacked trainable tensors, the per-row losses of one step,
a slot's flat vector and a way to load one. Everything else is here, once, for every engine:

- a duplicate id refuses the batch; ``progress(done, total[, loss])`` counts row-steps (with the running
  loss once one is known); each row's per-step loss, learning rate and gradient norm come back in its result;
- packs of ``config.pack`` rows; on out-of-memory a pack is split in halves and retried, and a row
  that runs out of memory alone fails alone;
- AdamW with a linear warm-up, built from the shared ``TrainingConfig`` fields;
- each row's gradient is clipped on its own (``clip_per_item``), so packing cannot change its update;
- a row whose loss goes NaN/inf is dropped with the step it failed at; the others go on; a step whose
  numbers leave float range for the whole pack (AdamW's step size ``lr / (1 - beta1)`` past float32's max,
  say ``learning_rate=1e38``) fails the pack's rows at that step, with the reason, instead of the batch.

Rows never mix: the loss is a plain sum of per-row losses, AdamW is element-wise and the clip is per
row, so a packed row trains to the weights it would reach alone, within float tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from weightzoo.storage.layout import Layout
from weightzoo.tasks import stop
from weightzoo.tasks.finetune.contract import BatchResult, ItemResult, TrainingConfig

Row = TypeVar("Row")
Progress = Callable[..., None]  # progress(done, total[, running loss]): row-steps, as tasks/progress.py's shape


class Pack(Protocol):
    """K adapters live in the base while the pack's ``with`` lasts; slot k is row k of the pack."""

    def parameters(self) -> Iterable[nn.Parameter]:
        """The trainable tensors, each stacked over the K slots on dim 0."""

    def losses(self, step: int, active: list[int]) -> torch.Tensor:
        """One forward of the ``active`` slots at ``step``: their losses, shape (len(active),)."""

    def flatten(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s adapter as a flat vector in the batch layout (storage dtype, CPU)."""

    def load(self, slot: int, vector: torch.Tensor | np.ndarray) -> None:
        """Start slot ``slot`` from ``vector`` (a flat vector in the batch layout) instead of the shared init."""


# A step observer: (steps done, the pack, whether training ends here); called at 0 and after every step.
Observer = Callable[[int, Pack, bool], None]


@dataclass
class Prepared:
    """An engine's batch, ready to train: its packs, layout, hparams, and the rows that failed already."""

    open_pack: Callable[[list[Any]], AbstractContextManager[Pack]]
    layout: Layout
    hparams: dict
    failures: dict[str, ItemResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # each ready row's share of preparation


@torch.no_grad()
def clip_per_item(params: Iterable[nn.Parameter], k: int, max_norm: float | None) -> torch.Tensor:
    """Clip each slot's gradient (dim 0 of every stacked tensor) to ``max_norm`` on its own, as
    ``torch.nn.utils.clip_grad_norm_`` would in a separate run; returns the (K,) pre-clip norms
    (``max_norm`` None: only measures them, for the trackers)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(k)
    norms = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
    if max_norm is None:
        return norms
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))
    return norms


def optimiser(params: Iterable[nn.Parameter], c: TrainingConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its schedule (linear warm-up over ``lr_warmup_steps``, then constant): the one place
    the shared optimiser fields reach torch."""
    opt = torch.optim.AdamW(list(params), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                            eps=c.adam_epsilon, weight_decay=c.weight_decay)
    warm = c.lr_warmup_steps
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)


def prepare_rows(items: Sequence[Row], make: Callable[[Row], Any], label: str,
                 ) -> tuple[dict[str, Any], dict[str, ItemResult], dict[str, float]]:
    """``make(row)`` for every row: (id → input, id → failure for rows whose ``make`` raised, id → seconds)."""
    ready: dict[str, Any] = {}
    failures: dict[str, ItemResult] = {}
    seconds: dict[str, float] = {}
    for row in items:
        t0 = time.perf_counter()
        try:
            ready[row.id] = make(row)
        except Exception as exc:  # any failure to read or decode a row's inputs is that row's failure
            failures[row.id] = ItemResult(row.id, False, None, None, 0, time.perf_counter() - t0,
                                          f"{label}: {type(exc).__name__}: {exc}")
            continue
        seconds[row.id] = time.perf_counter() - t0
    return ready, failures, seconds


def check_unique(ids: Sequence[str]) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate ids in batch: {sorted({i for i in ids if ids.count(i) > 1})}")


@dataclass
class _Run:
    """One batch's training state shared by its packs: settings, progress and start vectors."""

    config: TrainingConfig
    open_pack: Callable[[list[Any]], AbstractContextManager[Pack]]
    total: int
    progress: Progress | None
    inits: Mapping[str, torch.Tensor | np.ndarray]
    observe: Observer | None = None
    done: int = 0
    loss: float | None = None  # running loss: mean finite loss of the pack's last check window

    def report(self) -> None:
        if self.progress is not None:  # the loss rides as the extra value (a terminal bar shows it)
            self.progress(self.done, self.total, *(() if self.loss is None else (self.loss,)))


def _drop_nonfinite(losses: torch.Tensor, since: int, active: list[int], failed: dict[int, tuple[int, str]]) -> None:
    """Move rows whose loss went NaN/inf since step ``since`` from ``active`` to ``failed`` (reads back one window)."""
    window = losses[since:].cpu()
    for slot in list(active):
        bad = (~torch.isfinite(window[:, slot])).nonzero()
        if len(bad):
            at = since + int(bad[0])
            failed[slot] = (at + 1, f"non-finite loss ({float(losses[at, slot])}) at step {at + 1}")
            active.remove(slot)


def _is_overflow(exc: BaseException) -> bool:
    """torch's refusal to turn a Python number into the tensor's dtype (c10's checked convert): the numbers of
    this step, not the code, left float range."""
    return "without overflow" in str(exc)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _fail_active(active: list[int], failed: dict[int, tuple[int, str]], step: int, why: str) -> None:
    """Every row still training fails at ``step`` (0-based) for one shared reason: a step of the whole pack
    that cannot be taken (its update overflowed)."""
    for slot in active:
        failed[slot] = (step, f"non-finite update at step {step + 1}: {why}")
    active.clear()


def _load_inits(run: _Run, pack: Pack, rows: list[Any]) -> None:
    with torch.no_grad():
        for slot, row in enumerate(rows):
            if row.id in run.inits:  # start from given weights (e.g. generated ones) instead
                pack.load(slot, run.inits[row.id])


def _steps(run: _Run, pack: Pack, k: int, failed: dict[int, tuple[int, str]],
           ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Train the pack's steps; returns the (steps, K) losses and pre-clip gradient norms (NaN where a row
    did not train) and each step's learning rate."""
    c, params = run.config, list(pack.parameters())
    opt, sched = optimiser(params, c)
    losses = torch.full((c.steps, k), float("nan"), device=params[0].device)
    norms, lrs = torch.full_like(losses, float("nan")), []  # kept on the device: read back once, at the end
    active, last_check, done_before = list(range(k)), 0, run.done
    act_t = torch.arange(k, device=losses.device)
    if run.observe is not None:
        run.observe(0, pack, False)
    for step in range(c.steps):
        stop.check()  # the command was interrupted: end within a step, rows left pending
        if len(act_t) != len(active):
            act_t = torch.tensor(active, device=losses.device)
        try:
            row_loss = pack.losses(step, active)
            row_loss.sum().backward()  # a plain sum: each adapter's gradient is exactly its own row's
            norm = clip_per_item(params, k, c.max_grad_norm)  # max_grad_norm None: measured, not clipped
            opt.step()
        except RuntimeError as exc:
            if not _is_overflow(exc):
                raise
            _fail_active(active, failed, step, f"{_first_line(exc)} (learning_rate {c.learning_rate:g})")
            run.done = done_before + k * c.steps  # a failed row counts all its steps, as a dropped one does
            run.report()
            break
        lrs.append(sched.get_last_lr()[0])  # the rate this step used
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses[step, act_t] = row_loss.detach()
        norms[step, act_t] = norm.to(norms.device)[act_t]
        if (step + 1) % c.check_every == 0 or step + 1 == c.steps:
            _drop_nonfinite(losses[: step + 1], last_check, active, failed)
            run.loss = _window_loss(losses[last_check : step + 1], run.loss)
            last_check = step + 1
            run.done = done_before + sum(step + 1 if i in active else c.steps for i in range(k))
            run.report()
        if run.observe is not None:
            run.observe(step + 1, pack, step + 1 == c.steps or not active)
        if not active:
            break
    return losses, norms, lrs


def _window_loss(window: torch.Tensor, before: float | None) -> float | None:
    """The mean of a check window's finite losses (``before`` when none was finite)."""
    finite = window[torch.isfinite(window)]
    return float(finite.mean()) if finite.numel() else before


def _train_pack(run: _Run, rows: list[Any]) -> list[ItemResult]:
    """Train ``rows`` together, one adapter each; a diverging row is dropped, the others go on."""
    started, k = time.perf_counter(), len(rows)
    failed: dict[int, tuple[int, str]] = {}
    with run.open_pack(rows) as pack:
        _load_inits(run, pack, rows)
        losses, norms, lrs = _steps(run, pack, k, failed)
        seconds = (time.perf_counter() - started) / k
        out = [_result(run.config, row.id, pack, slot, losses[:, slot].tolist(), failed.get(slot), seconds)
               for slot, row in enumerate(rows)]
    for slot, res in enumerate(out):  # the trackers' curves, as long as the row's loss history
        n = len(res.loss_history)
        res.lr_history, res.grad_norm_history = lrs[:n], norms[:n, slot].tolist()
    return out


def _result(c: TrainingConfig, row_id: str, pack: Pack, slot: int, history: list[float],
            failure: tuple[int, str] | None, seconds: float) -> ItemResult:
    """A row's outcome: its flattened adapter and final loss, or why it failed."""
    if failure is not None:
        at, reason = failure
        return ItemResult(row_id, False, None, None, at, seconds, reason, history[:at])
    flat = pack.flatten(slot)
    if not torch.isfinite(flat).all():
        reason = f"weights not finite in {c.weights_dtype} after training"
        return ItemResult(row_id, False, None, None, c.steps, seconds, reason, history)
    tail = history[-c.loss_window :]
    return ItemResult(row_id, True, flat, sum(tail) / len(tail), c.steps, seconds, None, history)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _train_with_retry(run: _Run, rows: list[Any]) -> list[ItemResult]:
    """Train a pack; on out-of-memory, split it in halves and retry each; a single row that OOMs fails."""
    done_before = run.done
    try:
        return _train_pack(run, rows)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        message = _first_line(exc)
    # Outside the except block, so the traceback's references to activations are gone before retrying.
    run.done = done_before
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(rows) == 1:
        run.done += run.config.steps
        run.report()
        return [ItemResult(rows[0].id, False, None, None, 0, 0.0, f"out of memory at pack size 1: {message}")]
    half = (len(rows) + 1) // 2
    return _train_with_retry(run, rows[:half]) + _train_with_retry(run, rows[half:])


def train_packs(open_pack: Callable[[list[Any]], AbstractContextManager[Pack]], rows: list[Any],
                config: TrainingConfig, *, progress: Progress | None = None,
                init_weights: Mapping[str, torch.Tensor | np.ndarray] | None = None,
                observe: Observer | None = None) -> list[ItemResult]:
    """Train ``rows`` in packs of ``config.pack`` (split on OOM); one result per row, in order."""
    run = _Run(config, open_pack, len(rows) * config.steps, progress, dict(init_weights or {}), observe)
    out: list[ItemResult] = []
    for i in range(0, len(rows), config.pack):
        out += _train_with_retry(run, rows[i : i + config.pack])
    return out


def train_batch(items: Sequence[Any], config: TrainingConfig, prepare: Callable[[list[Any]], Prepared], *,
                progress: Progress | None = None,
                init_weights: Mapping[str, torch.Tensor | np.ndarray] | None = None) -> BatchResult:
    """Check ids, ``prepare`` the batch (the engine's inputs), train its ready rows, and return one
    result per item in the order given (input failures included, with their reasons)."""
    ids = [r.id for r in items]
    check_unique(ids)
    prep = prepare(list(items))
    rows = [r for r in items if r.id not in prep.failures]
    results = dict(prep.failures)
    for res in train_packs(prep.open_pack, rows, config, progress=progress, init_weights=init_weights):
        res.seconds += prep.seconds.get(res.id, 0.0)
        results[res.id] = res
    return BatchResult(prep.layout, [results[i] for i in ids], prep.hparams)
