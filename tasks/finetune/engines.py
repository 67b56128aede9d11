"""Fine-tune engines by registered name. A flow parameter names an engine; it never names code to import.

An engine (``contract.Engine``) is what a worker needs to turn manifest rows into rows of a dataset:
how to load its base (once per process), how to fingerprint that base (stored with every row), how to
train one batch (``train(base, items, config, *, base_uri, cache_dir, progress) -> BatchResult``),
the fine-tune config model it accepts and the manifest checks its rows need. The built-in engines are
listed here; a plugin package adds one through the
``weightzoo.engines`` entry-point group (installed deliberately, so its import is the user's choice),
and a script or bench may ``register`` one in its own process, where only that process can use it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from weightzoo.errors import InputError
from weightzoo.tasks.finetune.contract import Engine

ENTRY_POINT_GROUP = "weightzoo.engines"
DEFAULT_ENGINE = "diffusers-lora"


def _diffusers_lora() -> Engine:
    from weightzoo.tasks.finetune.base_model import base_fingerprint, load_base
    from weightzoo.tasks.finetune.config import FinetuneConfig
    from weightzoo.tasks.finetune.engine import finetune_batch

    return Engine(DEFAULT_ENGINE, lambda uri, device: load_base(uri, device=device), base_fingerprint,
                  finetune_batch, FinetuneConfig)


def _edit_lora() -> Engine:
    from weightzoo.tasks.concepts.base import base_fingerprint, load_base
    from weightzoo.tasks.concepts.engine import EditFinetuneConfig
    from weightzoo.tasks.concepts.finetune import edit_finetune_batch
    from weightzoo.tasks.concepts.rows import EditRowRules

    return Engine("edit-lora", load_base, base_fingerprint, edit_finetune_batch, EditFinetuneConfig,
                  EditRowRules())


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
