"""An edit spec: a family (or a ``+`` composition of two) and its numeric parameters, read from attributes.

A manifest row of kind ``edit`` carries its spec as ``attributes``: ``{"family": "sepia", "strength": 0.7}``
or ``{"family": "sepia+blur", "strength": 0.7, "radius": 1.2}``. ``spec_problems`` says everything wrong
with one (unknown family, missing, unknown or out-of-range parameter) so manifest validation can report
it with every other row's problems; ``EditSpec.parse`` raises on the first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from weightzoo.errors import InputError
from weightzoo.tasks.concepts.edits import COMPOSE, FAMILIES, Family, Images

MAX_PARTS = 2  # compositions of two edits: enough for unseen combinations, few enough to learn


def _number(value: object) -> float | None:
    """A finite float from a number or numeric text, else None."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def family_parts(family: str) -> list[str]:
    return [p.strip() for p in str(family).split(COMPOSE)]


def spec_problems(attributes: Mapping[str, object]) -> list[str]:
    """Every reason ``attributes`` is not a renderable edit spec (empty list: it is one)."""
    if "family" not in attributes:
        return [f"edit spec has no 'family' (one of {', '.join(FAMILIES)}, or two joined by '{COMPOSE}')"]
    parts = family_parts(str(attributes["family"]))
    problems = [f"unknown edit family {p!r} (known: {', '.join(FAMILIES)})" for p in parts if p not in FAMILIES]
    if len(parts) > MAX_PARTS or len(set(parts)) != len(parts):
        problems.append(f"family {attributes['family']!r}: compose at most {MAX_PARTS} different families")
    if problems:
        return problems
    allowed = {name: param for p in parts for name, param in FAMILIES[p].params.items()}
    for key in sorted(set(attributes) - {"family"} - set(allowed)):
        problems.append(f"unknown parameter {key!r} for family {attributes['family']!r} (allowed: {', '.join(allowed)})")
    for name, param in allowed.items():
        if name not in attributes:
            problems.append(f"missing parameter {name!r} of family {attributes['family']!r}")
            continue
        x = _number(attributes[name])
        if x is None:
            problems.append(f"parameter {name!r} must be a number, got {attributes[name]!r}")
        elif not param.lo <= x <= param.hi:
            problems.append(f"parameter {name!r} = {x:g} is out of range [{param.lo:g}, {param.hi:g}]")
        elif param.integer and x != int(x):
            problems.append(f"parameter {name!r} must be a whole number, got {x:g}")
    return problems


@dataclass(frozen=True)
class EditSpec:
    """A validated edit: its families in order and every parameter as a float."""

    families: tuple[str, ...]
    params: Mapping[str, float]

    @classmethod
    def parse(cls, attributes: Mapping[str, object]) -> EditSpec:
        problems = spec_problems(attributes)
        if problems:
            raise InputError("; ".join(problems))
        parts = tuple(family_parts(str(attributes["family"])))
        names = [n for p in parts for n in FAMILIES[p].params]
        return cls(parts, {n: float(_number(attributes[n])) for n in names})  # type: ignore[arg-type]

    @property
    def family(self) -> str:
        return COMPOSE.join(self.families)

    def _part(self, name: str) -> tuple[Family, dict[str, float]]:
        fam = FAMILIES[name]
        return fam, {k: self.params[k] for k in fam.params}

    def apply(self, images: Images) -> Images:
        """The edited images (deterministic); ``images`` is (n, 3, H, W) float in [0, 1]."""
        for name in self.families:
            fam, kwargs = self._part(name)
            images = fam.apply(images, **kwargs)
        return images.contiguous()

    def describe(self) -> str:
        """The concept's text, e.g. 'sepia tone, strength 0.7, then gaussian blur, radius 1.2'."""
        return ", then ".join(fam.describe(kw) for fam, kw in (self._part(n) for n in self.families))

    def attributes(self) -> dict[str, float | str]:
        """The spec as manifest attributes (numbers as numbers)."""
        return {"family": self.family, **self.params}
