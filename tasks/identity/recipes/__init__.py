"""Personalisation recipes by registered name: ``FinetuneConfig.method`` is one of ``names()``.

``NAMES`` is the registry: each name's one-line doc, options model (``options.py``), whether its rows
are peft LoRA layouts, and the module of this package whose ``RECIPES`` (a tuple of ``base.Recipe``)
holds its code. The registry imports no torch, so the CLI makes its flags and validates a config
without loading any recipe; ``get(name)`` imports the recipe's module on first use. Adding a method is
adding one module and one entry here (docs/RECIPES.md). Names are the only way a config selects a
recipe: a parameter never names code to import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from weightzoo.errors import InputError
from weightzoo.tasks.identity.recipes.options import CelebBasisConfig, NoRecipeConfig, PerfusionConfig

if TYPE_CHECKING:
    from weightzoo.tasks.identity.recipes.base import Recipe


@dataclass(frozen=True)
class Entry:
    """A registered recipe, as far as a config needs it (no torch): doc, options, family, its module."""

    doc: str  # one line for --help and docs
    module: str  # the module of this package that defines its ``RECIPES``
    options: type[BaseModel] = NoRecipeConfig
    lora_family: bool = False  # rows are peft LoRA layouts (``merge``, the peft export and subspace tools read them)


# "lora" first: it is the default and the order --help lists them in.
NAMES: dict[str, Entry] = {
    "lora": Entry("LoRA: train A and B of (alpha/r)·B A on the target UNet layers.", "lora", lora_family=True),
    "orthogonal": Entry("Orthogonal Adaptation: A fixed to id-picked rows of an orthogonal basis, train B; "
                        "rows merge by summing.", "lora", lora_family=True),
    "lora_fa": Entry("LoRA-FA: A frozen to one seeded orthogonal basis per layer shared by every row (the "
                     "layout rebuilds it), train B; rows hold B only.", "lora", lora_family=True),
    "celeb_basis": Entry("Celeb Basis: learn words x basis_size coefficients of new words over celebrity-name "
                         "embeddings.", "celeb_basis", CelebBasisConfig),
    "perfusion": Entry("Perfusion: gated rank-1 edits of cross-attention K (locked to the class key) and V, plus a "
                       "concept embedding.", "perfusion", PerfusionConfig),
}


def names() -> tuple[str, ...]:
    return tuple(NAMES)


def entry(name: str) -> Entry:
    """The registry entry of ``name``; an unknown name is a user error naming the known ones."""
    try:
        return NAMES[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; registered recipes: {', '.join(NAMES)}") from None


def options(name: str, values: dict[str, Any]) -> BaseModel:
    """``values`` (a config's ``recipe_options``) validated by recipe ``name``'s options model."""
    try:
        return entry(name).options(**values)
    except ValueError as exc:
        raise InputError(f"recipe_options for method {name!r}: {exc}") from exc


def get(name: str) -> Recipe:
    """The recipe registered as ``name`` (its module imported here, on first use)."""
    module = importlib.import_module(f"{__name__}.{entry(name).module}")
    found = [r for r in getattr(module, "RECIPES", ()) if r.name == name]
    if len(found) != 1:
        raise RuntimeError(f"recipe {name!r}: {module.__name__} defines it {len(found)} times, not once")
    return found[0]
