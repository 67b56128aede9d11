"""An engine that trains nothing, for measuring orchestration overhead. Registered only by the benches.

It returns zero weights of the weights2weights SD 1.5 size for every item, instantly, through the same
registry as the real engine: each batch still validates, plans, loads the (tiny) base, writes and
commits a real shard and records its items. Never part of the package: a flow parameter cannot name it
in a process that did not ``register_null_engine()`` first.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from weightzoo.storage.layout import Layout
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.contract import Engine
from weightzoo.tasks.finetune.driver import Prepared
from weightzoo.tasks.finetune.row import ManifestRow

NULL_ENGINE = "null"
# SD 1.5 rank-1 to_q/to_v in weights2weights is 99,648 values; a null row has that size in one tensor,
# so shard writes cost what they cost for real rows.
NULL_LAYOUT = Layout(("null.lora.weight",), ((99_648,),), "float16")


class NullPack:
    """K zero adapters: the driver's steps run as for a real engine, each one a zero loss on a 1-value slot."""

    def __init__(self, k: int) -> None:
        self.slots = nn.Parameter(torch.zeros(k, 1))

    def parameters(self) -> list[nn.Parameter]:
        return [self.slots]

    def losses(self, step: int, active: list[int]) -> torch.Tensor:
        return self.slots[active, 0] * 0.0

    def flatten(self, slot: int) -> torch.Tensor:
        return torch.zeros(NULL_LAYOUT.numel, dtype=NULL_LAYOUT.torch_dtype)

    def load(self, slot: int, vector: Any) -> None:
        """A null row has nothing to start from."""


def null_prepare(pipe: Any, items: list[ManifestRow], config: Any, *, base_uri: str | None = None,
                 cache_dir: str | None = None) -> Prepared:
    """Every item ready at once, packs of zero adapters: the engine contract with no inputs and no training."""
    return Prepared(lambda rows: nullcontext(NullPack(len(rows))), NULL_LAYOUT, {"method": "null"})


def register_null_engine() -> str:
    """Register the null engine in this process (the real base loader, so a batch pays its load) and
    return its name."""
    real = engines.get(engines.DEFAULT_ENGINE)
    engines.register(Engine(NULL_ENGINE, real.load_base, real.fingerprint, null_prepare, real.config))
    return NULL_ENGINE
