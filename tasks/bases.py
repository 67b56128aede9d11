"""The offline bases by kind, one entry point for ``weightzoo base`` and the demo pipeline.

world: the pretrained text-to-image base that draws the procedural world (tasks/world/base.py);
toy: the random-weights SD-1.5-shaped tiny pipeline (tasks/finetune/base_model.py);
edit: the pretrained image-to-image base of the edit workload (tasks/concepts/base.py).
Each is kept when its folder already holds it.
"""

from __future__ import annotations

import json
from pathlib import Path

from weightzoo.errors import InputError

EDIT_BASE_STEPS = 200  # the edit base learns general editing features in about a minute on 2 cores


def make_base(kind: str, out: str, seed: int = 0, steps: int | None = None, vae_steps: int | None = None,
              pool: int | None = None, rebuild: bool = False) -> tuple[str, dict]:
    """Make (or keep) the ``kind`` base at ``out``; returns its URI and what its build recorded (may be empty).
    ``None`` settings take the kind's defaults; ``rebuild``: pretrain the world base even where weightzoo
    ships it (the shipped one is what that makes, on one thread)."""
    if kind == "world":
        from weightzoo.tasks.world.base import INFO_FILE, save_world_base
        from weightzoo.tasks.world.config import WorldBaseSettings

        given = {"steps": steps, "vae_steps": vae_steps, "pool": pool}
        settings = WorldBaseSettings(seed=seed, **{k: v for k, v in given.items() if v is not None})
        path = save_world_base(out, settings, rebuild)
        return str(path), json.loads((path / INFO_FILE).read_text())
    if kind == "edit":
        from weightzoo.tasks.concepts.base import make_base as make_edit_base

        return make_edit_base(out, EDIT_BASE_STEPS if steps is None else steps, seed=seed), {}
    if kind == "toy":
        from weightzoo.tasks.finetune.base_model import save_tiny_pipeline

        if not (Path(out) / "model_index.json").exists():
            save_tiny_pipeline(Path(out), seed=seed)
        return out, {}
    raise InputError(f"unknown base kind {kind!r}; choose world, toy or edit")
