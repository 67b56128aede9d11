"""The ``edit-lora`` engine's ``prepare`` (rows in, the shared driver's batch out) and
``edit_finetune_batch``, its one-call form for tests and benches (a build runs the driver itself).

``prepare`` makes the batch (each row's pairs: a row whose images cannot be read fails alone, with the reason)
and hands it to the shared batch driver (``tasks/finetune/driver.py``), which trains packs of
``config.pack`` rows in ``engine.open_edit_pack`` and returns one ``ItemResult`` per row in the order
given. ``init_weights`` starts named rows from given vectors (a generated LoRA) instead of the shared
init; the bench uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from weightzoo.tasks.concepts.base import SkipUNetGenerator
from weightzoo.tasks.concepts.config import EditFinetuneConfig
from weightzoo.tasks.concepts.engine import edit_layout, open_edit_pack
from weightzoo.tasks.concepts.pairs import concept_pairs
from weightzoo.tasks.device import use_bf16
from weightzoo.tasks.finetune.contract import BatchResult
from weightzoo.tasks.finetune.driver import Prepared, prepare_rows, train_batch
from weightzoo.tasks.finetune.row import ManifestRow


def resolved_hparams(model: SkipUNetGenerator, config: EditFinetuneConfig) -> dict:
    """The config as stored with every row, plus what export and loading need to know about the base."""
    size = config.resolution or model.config.image_size
    device = next(model.parameters()).device
    return {**config.model_dump(mode="json"), "resolution": size, "base_class": type(model).__name__,
            "mixed_precision": "bf16" if use_bf16(config.mixed_precision, device) else "no",
            "base_config": model.config.model_dump(mode="json")}


def prepare(model: SkipUNetGenerator, items: list[ManifestRow], config: EditFinetuneConfig, *,
            base_uri: str | None = None, cache_dir: str | None = None) -> Prepared:
    """Each row's pairs (files, or rendered on the shared source pool), and packs to open on ``model``;
    ``base_uri``: the manifest's folder, for relative paths; ``cache_dir`` is unused (nothing to cache)."""
    size = config.resolution or model.config.image_size
    data, failures, seconds = prepare_rows(
        items, lambda row: concept_pairs(row, base_uri, train=config.train_pairs, held_out=config.eval_pairs,
                                         size=size, data_seed=config.data_seed), "pairs")
    layout = edit_layout(model, config)
    return Prepared(lambda rows: open_edit_pack(model, [data[r.id] for r in rows], config, layout), layout,
                    resolved_hparams(model, config), failures, seconds)


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
    return train_batch(items, config, lambda rows: prepare(model, rows, config, base_uri=base_uri),
                       progress=progress, init_weights=init_weights)
