"""An engine that trains nothing, for measuring orchestration overhead. Registered only by the benches.

It returns zero weights of the weights2weights SD 1.5 size for every item, instantly, through the same
registry as the real engine: each batch still validates, plans, loads the (tiny) base, writes and
commits a real shard and records its items. Never part of the package: a flow parameter cannot name it
in a process that did not ``register_null_engine()`` first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from weightzoo.storage.layout import Layout
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.contract import BatchResult, Engine, ItemResult
from weightzoo.tasks.finetune.driver import check_unique
from weightzoo.tasks.finetune.row import ManifestRow

NULL_ENGINE = "null"
# SD 1.5 rank-1 to_q/to_v in weights2weights is 99,648 values; a null row has that size in one tensor,
# so shard writes cost what they cost for real rows.
NULL_LAYOUT = Layout(("null.lora.weight",), ((99_648,),), "float16")


def null_finetune(pipe: Any, items: list[ManifestRow], config: Any, *, base_uri: str | None = None,
                  cache_dir: str | None = None, progress: Callable[[int, int], None] | None = None) -> BatchResult:
    """Zero weights for every item, instantly (the engine contract's result types, no training)."""
    check_unique([r.id for r in items])
    zeros = torch.zeros(NULL_LAYOUT.numel, dtype=NULL_LAYOUT.torch_dtype)
    if progress is not None:
        progress(len(items), len(items))
    return BatchResult(NULL_LAYOUT, [ItemResult(r.id, True, zeros, 0.0, 0, 0.0, None) for r in items], {"method": "null"})


def register_null_engine() -> str:
    """Register the null engine in this process (the real base loader, so a batch pays its load) and
    return its name."""
    real = engines.get(engines.DEFAULT_ENGINE)
    engines.register(Engine(NULL_ENGINE, real.load_base, real.fingerprint, null_finetune, real.config))
    return NULL_ENGINE
