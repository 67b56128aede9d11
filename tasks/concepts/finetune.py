"""``edit_finetune_batch``: the ``edit-lora`` engine's ``train`` (rows in, ``BatchResult`` out).

Reads each row's pairs (a row whose images cannot be read fails alone, with the reason), trains packs
of ``config.pack`` rows with ``engine.train_concepts``, and returns one ``ItemResult`` per row in the
order given. ``init_weights`` starts named rows from given vectors (a generated LoRA) instead of the
shared init; the bench uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
import torch

from weightzoo.tasks.concepts.base import SkipUNetGenerator
from weightzoo.tasks.concepts.engine import ConceptRun, EditFinetuneConfig, edit_layout, train_concepts
from weightzoo.tasks.concepts.pairs import Pairs, concept_pairs
from weightzoo.tasks.finetune.engine import BatchResult, ItemResult
from weightzoo.tasks.finetune.manifest import ManifestRow


def resolved_hparams(model: SkipUNetGenerator, config: EditFinetuneConfig) -> dict:
    """The config as stored with every row, plus what export and loading need to know about the base."""
    size = config.image_size or model.config.image_size
    return {**config.model_dump(mode="json"), "image_size": size, "base_class": type(model).__name__,
            "base_config": model.config.model_dump(mode="json")}


def _item(row: ManifestRow, run: ConceptRun, config: EditFinetuneConfig, seconds: float) -> ItemResult:
    if run.failed is not None:
        at, reason = run.failed
        return ItemResult(row.id, False, None, None, at, seconds, reason, run.losses[:at])
    assert run.weights is not None
    tail = run.losses[-config.loss_window :]
    weights = run.weights.to(getattr(torch, config.weights_dtype))
    return ItemResult(row.id, True, weights, sum(tail) / len(tail), config.steps, seconds, None, run.losses)


def _reporter(progress: Callable[[int, int], None] | None, done: int, n: int, total: int) -> Callable[[int], None] | None:
    """Turn a pack's steps into row-steps of the whole batch for ``progress(done, total)``."""
    if progress is None:
        return None
    return lambda steps: progress(done + steps * n, total)


def edit_finetune_batch(
    model: SkipUNetGenerator,
    items: list[ManifestRow],
    config: EditFinetuneConfig,
    *,
    base_uri: str | None = None,
    cache_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    init_weights: Mapping[str, torch.Tensor | np.ndarray] | None = None,
) -> BatchResult:
    """Fine-tune one adapter per row of ``items`` on ``model`` (left as it was); ``cache_dir`` is unused."""
    ids = [r.id for r in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate ids in batch: {sorted({i for i in ids if ids.count(i) > 1})}")
    size = config.image_size or model.config.image_size
    layout = edit_layout(model, config)
    results: dict[str, ItemResult] = {}
    data: dict[str, Pairs] = {}
    for row in items:
        t0 = time.perf_counter()
        try:
            data[row.id] = concept_pairs(row, base_uri, train=config.train_pairs, held_out=config.eval_pairs,
                                         size=size, data_seed=config.data_seed)
        except Exception as exc:  # unreadable images or a bad spec fail this row, not the batch
            results[row.id] = ItemResult(row.id, False, None, None, 0, time.perf_counter() - t0,
                                         f"pairs: {type(exc).__name__}: {exc}")
    rows = [r for r in items if r.id in data]
    total, done = len(rows) * config.steps, 0
    inits = dict(init_weights or {})
    for i in range(0, len(rows), config.pack):
        pack = rows[i : i + config.pack]
        t0 = time.perf_counter()
        report = _reporter(progress, done, len(pack), total)
        runs = train_concepts(model, [data[r.id] for r in pack], config, layout, [inits.get(r.id) for r in pack],
                              progress=report)
        seconds = (time.perf_counter() - t0) / len(pack)
        for row, run in zip(pack, runs, strict=True):
            results[row.id] = _item(row, run, config, seconds)
        done += len(pack) * config.steps
    return BatchResult(layout, [results[i] for i in ids], resolved_hparams(model, config))
