"""A third fine-tune engine, written only against the engine contract, as a plugin author would: the proof
that adding a workload takes one module (tests/test_third_engine.py builds with it).

``prompt-fit``: each manifest row's "adapter" is one vector fitted, by the shared driver's AdamW, to a
target the base derives from the row's prompt (a fixed random projection of the prompt's hash). The base is
one small JSON file. What it shows: its own config model (``PromptFitConfig``, derived from
``contract.TrainingConfig``), its own base loader and fingerprint, its own pack trainer run by
``driver.train_batch`` (through ``Prepared``), its own row rules (no images: a prompt is the whole input),
its light base check, its toy base and its demo rows. Nothing outside this file names it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from weightzoo.errors import InputError, NotFoundError
from weightzoo.storage.fs import filesystem, join, write_bytes
from weightzoo.storage.layout import Layout
from weightzoo.tasks.finetune import engines
from weightzoo.tasks.finetune.contract import Engine, RowRules, TrainingConfig
from weightzoo.tasks.finetune.driver import Prepared, prepare_rows
from weightzoo.tasks.finetune.readers import write_manifest
from weightzoo.tasks.finetune.row import ManifestRow

NAME = "prompt-fit"
BASE_FILE = "prompt_fit_base.json"
FEATURES = 16  # values hashed from a prompt; the base projects them to the row's width


class PromptFitConfig(TrainingConfig):
    """The shared training fields with this engine's defaults, plus its own: how far targets reach."""

    method: Literal["fit"] = Field("fit", description="The one method: fit a vector to the prompt's target.")
    # A vector, not a network: it converges in tens of steps at a learning rate no LoRA would take.
    steps: int = Field(60, ge=1, description="Optimiser steps per row.")
    learning_rate: float = Field(0.1, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    max_grad_norm: float | None = Field(None, gt=0, description="Per-row gradient-norm clip; None disables it.")
    loss_window: int = Field(5, ge=1, description="Steps averaged for the reported final loss.")
    weights_dtype: Literal["float16", "bfloat16", "float32"] = Field("float32", description="Storage dtype.")
    target_scale: float = Field(1.0, gt=0, description="Targets are the base's projection times this.")


class PromptOnly(RowRules):
    """Rows need no images (the shared rule would ask for some) and no targets."""

    def images(self, row: Any, base_uri: str | None) -> tuple[list[str], str | None]:
        return [], None


# -- the base: one JSON file ---------------------------------------------------------------------------


def check_base(base: str) -> None:
    """A prompt-fit base: its JSON file parses and gives a width (nothing else is read)."""
    fs, path = filesystem(base)
    try:
        spec = json.loads(fs.cat_file(join(path, BASE_FILE)))
    except FileNotFoundError:
        raise NotFoundError(f"no prompt-fit base ({BASE_FILE}) at {base}") from None
    except ValueError as e:
        raise InputError(f"{base}/{BASE_FILE} does not parse: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("width"), int):
        raise InputError(f"{base}/{BASE_FILE} gives no width")


def toy_base(out: str, *, seed: int = 0, width: int = 6) -> str:
    """A base of ``width`` values per row at ``out``; kept if one is there."""
    fs, path = filesystem(out)
    if not fs.exists(join(path, BASE_FILE)):
        write_bytes(fs, join(path, BASE_FILE), json.dumps({"width": width, "seed": seed}).encode())
    return out


def load_base(uri: str, device: str) -> torch.Tensor:
    """The base's projection (width, FEATURES), drawn from its seed."""
    fs, path = filesystem(uri)
    spec = json.loads(fs.cat_file(join(path, BASE_FILE)))
    g = torch.Generator().manual_seed(spec["seed"])
    return (torch.randn(spec["width"], FEATURES, generator=g) / FEATURES**0.5).to(device)


def fingerprint(uri: str) -> str:
    fs, path = filesystem(uri)
    return hashlib.sha256(fs.cat_file(join(path, BASE_FILE))).hexdigest()[:16]


def target(projection: torch.Tensor, prompt: str, scale: float) -> torch.Tensor:
    """The vector a row of ``prompt`` is fitted to."""
    if not prompt.strip():
        raise ValueError("empty prompt")
    digest = np.frombuffer(hashlib.sha256(prompt.encode()).digest()[:FEATURES], dtype=np.uint8)
    features = torch.tensor((digest.astype(np.float32) - 127.5) / 64.0, device=projection.device)
    return scale * projection @ features


def demo_rows(workdir: str, items: int, *, seed: int = 0) -> str:
    """``items`` rows of distinct prompts as ``workdir/manifest.jsonl``."""
    rows = [ManifestRow(id=f"thing-{seed}-{i:03d}", kind="concept", prompt=f"thing number {i} of {seed}",
                        attributes={"parity": "even" if i % 2 == 0 else "odd"}) for i in range(items)]
    return write_manifest(rows, join(workdir, "manifest.jsonl"))


# -- the trainer: K vectors at the shared init (zeros), one loss per row ------------------------------


class FitPack:
    """K vectors stacked on dim 0; slot k is row k of the pack."""

    def __init__(self, targets: torch.Tensor, layout: Layout) -> None:
        self.targets, self.layout = targets, layout
        self.vectors = nn.Parameter(torch.zeros_like(targets))

    def parameters(self) -> list[nn.Parameter]:
        return [self.vectors]

    def losses(self, step: int, active: list[int]) -> torch.Tensor:
        idx = torch.tensor(active, device=self.vectors.device)
        return (self.vectors[idx] - self.targets[idx]).pow(2).mean(1)

    def flatten(self, slot: int) -> torch.Tensor:
        return self.vectors[slot].detach().to(self.layout.torch_dtype).cpu().clone()

    def load(self, slot: int, vector: Any) -> None:
        with torch.no_grad():
            self.vectors[slot].copy_(torch.as_tensor(np.asarray(vector), dtype=self.vectors.dtype))


def prepare(projection: torch.Tensor, items: list[ManifestRow], config: PromptFitConfig, *,
            base_uri: str | None = None, cache_dir: str | None = None) -> Prepared:
    """Each row's target (a row whose prompt is empty fails alone); packs of fresh vectors to fit them."""
    targets, failures, seconds = prepare_rows(items, lambda r: target(projection, r.prompt, config.target_scale),
                                              "prompt")
    layout = Layout(("prompt_fit.vector",), ((projection.shape[0],),), config.weights_dtype)

    @contextmanager
    def open_pack(rows: list[ManifestRow]) -> Iterator[FitPack]:
        yield FitPack(torch.stack([targets[r.id] for r in rows]), layout)

    return Prepared(open_pack, layout, config.model_dump(mode="json"), failures, seconds)


def register() -> str:
    """Register the engine in this process (a plugin would list ``engine`` under the ``weightzoo.engines``
    entry-point group instead) and return its name."""
    engines.register(engine())
    return NAME


def engine() -> Engine:
    return Engine(NAME, load_base, fingerprint, prepare, PromptFitConfig, PromptOnly(),
                  check_base=check_base, toy_base=toy_base, demo_rows=demo_rows)
