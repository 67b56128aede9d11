"""Personalisation recipes by registered name: ``FinetuneConfig.method`` is one of ``names()``.

Every module of this package that defines ``RECIPES`` (a tuple of ``base.Recipe``) is registered when
the package is imported, so adding a method is adding one module (docs/RECIPES.md). Names are the
only way a config selects a recipe: a parameter never names code to import.
"""

from __future__ import annotations

import importlib
import pkgutil

from weightzoo.errors import InputError
from weightzoo.tasks.finetune.recipes.base import Recipe


def _discover() -> dict[str, Recipe]:
    found: dict[str, Recipe] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for recipe in getattr(module, "RECIPES", ()):
            if recipe.name in found:
                raise RuntimeError(f"recipe {recipe.name!r} is defined twice (second in {module.__name__})")
            found[recipe.name] = recipe
    # "lora" first: it is the default and the order --help lists them in.
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != "lora", kv[0] != "orthogonal", kv[0])))


RECIPES: dict[str, Recipe] = _discover()


def names() -> tuple[str, ...]:
    return tuple(RECIPES)


def get(name: str) -> Recipe:
    """The recipe registered as ``name``."""
    try:
        return RECIPES[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; registered recipes: {', '.join(RECIPES)}") from None
