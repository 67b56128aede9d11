"""The offline bases by kind, one entry point for ``weightzoo base`` and the demo pipeline.

world: the pretrained text-to-image base that draws the procedural world (tasks/world/base.py);
every other kind is an engine's toy base (``contract.Engine.toy_base``): ``toy`` the identity engine's (a
tiny random-weights pipeline of a model family), ``edit`` the edit engine's (its small image-to-image base,
pretrained offline), and any registered engine's name that engine's. Each is kept when its folder already
holds it. Nothing here names a workload's code: the engine brings it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

from weightzoo.errors import InputError
from weightzoo.tasks.finetune import engines

WORLD = "world"
# Base kinds that are a built-in engine's toy base, by the names ``weightzoo base --kind`` has always taken.
KIND_ENGINES = {"toy": engines.DEFAULT_ENGINE, "edit": "edit-lora"}


def engine_of(kind: str) -> str:
    """The engine whose toy base ``kind`` is (``toy``, ``edit``, or an engine's own name)."""
    if kind in KIND_ENGINES:
        return KIND_ENGINES[kind]
    if kind not in engines.names():
        raise InputError(f"unknown base kind {kind!r}; choose {WORLD}, {', '.join(KIND_ENGINES)} or an engine: "
                         f"{', '.join(engines.names())}")
    return kind


def _refuse_unknown(make: Callable[..., str], options: dict[str, Any], engine: str) -> None:
    """An option the engine's toy base does not take is refused in one line (not a TypeError later)."""
    try:
        params = inspect.signature(make).parameters
    except (TypeError, ValueError):  # no signature to read: the call itself will tell
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    extra = [k for k in options if k not in params]
    if extra:
        raise InputError(f"the {engine} engine's toy base takes no {', '.join(extra)}")


def make_base(kind: str, out: str, seed: int = 0, steps: int | None = None, vae_steps: int | None = None,
              pool: int | None = None, rebuild: bool = False, family: str | None = None) -> tuple[str, dict]:
    """Make (or keep) the ``kind`` base at ``out``; returns its URI and what its build recorded (may be empty).
    ``None`` settings take the kind's defaults; ``rebuild``: pretrain the world base even where weightzoo
    ships it (the shipped one is what that makes, on one thread). ``steps`` and ``family`` go to an engine's
    toy base when given (the edit base's pretraining steps, the identity base's model family)."""
    if kind == WORLD:
        from weightzoo.tasks.world.base import INFO_FILE, save_world_base
        from weightzoo.tasks.world.config import WorldBaseSettings

        if family not in (None, "sd"):
            raise InputError(f"the world base is an sd pipeline; family {family!r} is for a toy base")
        given = {"steps": steps, "vae_steps": vae_steps, "pool": pool}
        settings = WorldBaseSettings(seed=seed, **{k: v for k, v in given.items() if v is not None})
        path = save_world_base(out, settings, rebuild)
        return str(path), json.loads((path / INFO_FILE).read_text())
    engine = engines.get(engine_of(kind))
    if engine.toy_base is None:
        raise InputError(f"engine {engine.name!r} has no toy base (its Engine.toy_base is None)")
    options = {k: v for k, v in (("steps", steps), ("family", family)) if v is not None}
    _refuse_unknown(engine.toy_base, options, engine.name)
    return engine.toy_base(out, seed=seed, **options), {}
