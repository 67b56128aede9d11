"""Fine-tune engines by registered name. A flow parameter names an engine; it never names code to import.

An engine (``contract.Engine``) is what a worker needs to turn manifest rows into rows of a dataset:
how to load its base (once per process), how to fingerprint that base (stored with every row), how to
prepare one batch for the shared driver (``prepare(base, items, config, *, base_uri, cache_dir) ->
driver.Prepared``), the fine-tune config model it accepts and the manifest checks its rows need; and,
optionally, a light base check, a toy base and demo rows (the build's checks, ``weightzoo base`` and the
demo ask the engine for those, never a workload's name).
A built-in engine's entry imports no torch: its config, row rules and checks are torch-free modules and its
other functions are imported on first call, so the CLI builds flags from ``get(name).config`` at once. The
built-in engines are listed here; a plugin package adds one through the
``weightzoo.engines`` entry-point group (installed deliberately, so its import is the user's choice),
and a script or bench may ``register`` one in its own process, where only that process can use it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from weightzoo.errors import InputError
from weightzoo.tasks.finetune.contract import Engine

ENTRY_POINT_GROUP = "weightzoo.engines"
DEFAULT_ENGINE = "diffusers-lora"


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported at its first call (the engine modules import torch)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    return call


def _diffusers_lora() -> Engine:
    from weightzoo.tasks.identity import workload
    from weightzoo.tasks.identity.config import FinetuneConfig

    base, engine = "weightzoo.tasks.identity.base_model", "weightzoo.tasks.identity.engine"
    return Engine(DEFAULT_ENGINE, _lazy(base, "load_base"), _lazy(base, "base_fingerprint"),
                  _lazy(engine, "prepare"), FinetuneConfig, check_base=workload.check_base,
                  toy_base=workload.toy_base, demo_rows=workload.demo_rows)


def _edit_lora() -> Engine:
    from weightzoo.tasks.concepts import workload
    from weightzoo.tasks.concepts.config import EditFinetuneConfig
    from weightzoo.tasks.concepts.rows import EditRowRules

    base, engine = "weightzoo.tasks.concepts.base", "weightzoo.tasks.concepts.finetune"
    return Engine("edit-lora", _lazy(base, "load_base"), _lazy(base, "base_fingerprint"),
                  _lazy(engine, "prepare"), EditFinetuneConfig, EditRowRules(),
                  _lazy("weightzoo.tasks.concepts.task_loss", "edit_task_loss"), check_base=workload.check_base,
                  toy_base=workload.toy_base, demo_rows=workload.demo_rows)


# Factories, so that naming an engine imports nothing heavy until it is used.
_BUILTIN: dict[str, Callable[[], Engine]] = {DEFAULT_ENGINE: _diffusers_lora, "edit-lora": _edit_lora}
_REGISTERED: dict[str, Engine] = {}


def register(engine: Engine) -> None:
    """Make ``engine`` usable by name in this process (benches, tests, plugins' own setup)."""
    if engine.name in _BUILTIN:
        raise InputError(f"engine name {engine.name!r} is built in")
    _REGISTERED[engine.name] = engine
    get.cache_clear()


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    """Every engine name usable here: built in, registered in this process, installed as a plugin."""
    return sorted({*_BUILTIN, *_REGISTERED, *_plugins()})


def canonical(name: str) -> str:
    """``name`` if an engine is registered under it; refuses anything else."""
    if name not in _BUILTIN and name not in _REGISTERED and name not in _plugins():
        raise InputError(f"unknown engine {name!r}; registered engines: {', '.join(names())}")
    return name


@functools.cache
def get(name: str) -> Engine:
    """The engine registered as ``name`` (a plugin's module is imported here, on first use)."""
    name = canonical(name)
    if name in _BUILTIN:
        return _BUILTIN[name]()
    if name in _REGISTERED:
        return _REGISTERED[name]
    engine = _plugins()[name].load()
    engine = engine() if callable(engine) and not isinstance(engine, Engine) else engine
    if not isinstance(engine, Engine) or engine.name != name:
        raise InputError(f"entry point {name!r} in {ENTRY_POINT_GROUP} does not give an Engine named {name!r}")
    return engine
