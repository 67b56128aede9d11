"""Concept manifests of any size: random editing concepts, with a held-out split that tests generalisation.

``concept_rows`` draws ``n`` concepts (kind ``edit``): a family or a composition of two, parameters
rounded to two decimals so prompts read naturally ("sepia tone, strength 0.73"). Training concepts
never take parameter values in each parameter's *held-out band* (40-55 % of its range) and never use a
*held-out composition*; ``heldout_rows`` draws concepts from exactly those, so a weight generator is
measured on parameter values and combinations it never saw. Rows are procedural (weightzoo renders
their pairs); ``write_pairs`` instead renders them to files, for a manifest of source→target pairs.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from weightzoo.storage.fs import join
from weightzoo.tasks.concepts.edits import COMPOSE, FAMILIES, Param
from weightzoo.tasks.concepts.sources import source_images, to_image
from weightzoo.tasks.concepts.spec import EditSpec
from weightzoo.tasks.finetune.readers import write_manifest
from weightzoo.tasks.finetune.row import ManifestRow
from weightzoo.tasks.seeds import stable_seed

HELDOUT_BAND = (0.40, 0.55)  # share of each parameter's range that training concepts never use
COMPOSE_SHARE = 0.3  # share of concepts that are two-edit compositions


def _value(param: Param, u: float) -> float:
    x = param.lo + u * (param.hi - param.lo)
    return float(round(x)) if param.integer else round(x, 2)


def _in_band(param: Param, x: float) -> bool:
    lo, hi = (param.lo + b * (param.hi - param.lo) for b in HELDOUT_BAND)
    return lo <= x <= hi


def heldout_compositions(seed: int = 0, k: int = 12) -> list[str]:
    """``k`` ordered family pairs that training concepts never use (seeded)."""
    pairs = [f"{a}{COMPOSE}{b}" for a, b in itertools.permutations(FAMILIES, 2)]
    return sorted(random.Random(f"weightzoo-heldout-compositions:{seed}").sample(pairs, k))


def _draw(rng: random.Random, family: str, heldout_values: bool) -> EditSpec:
    """A spec of ``family`` with parameters inside (held-out) or outside (training) the held-out band."""
    params: dict[str, float] = {}
    for name in family.split(COMPOSE):
        for pname, param in FAMILIES[name].params.items():
            for _ in range(1000):
                x = _value(param, rng.random())
                if _in_band(param, x) == heldout_values or (param.integer and param.hi - param.lo < 4):
                    break
            params[pname] = x
    return EditSpec.parse({"family": family, **params})


def random_spec(g: torch.Generator, compose_share: float = COMPOSE_SHARE) -> EditSpec:
    """Any edit at all (for pretraining the base): uniform family, uniform parameters."""
    rng = random.Random(int(torch.randint(0, 2**62, (), generator=g)))
    names = list(FAMILIES)
    family = rng.choice(names)
    if rng.random() < compose_share:
        family += COMPOSE + rng.choice([n for n in names if n != family])
    return _draw(rng, family, heldout_values=rng.random() < 0.15)


def _row(i: int, spec: EditSpec, prefix: str) -> ManifestRow:
    return ManifestRow(id=f"{prefix}-{i:05d}", kind="edit", prompt=spec.describe(), class_prompt="image",
                       attributes=spec.attributes())


def concept_rows(n: int, seed: int = 0, prefix: str = "edit", families: Sequence[str] | None = None) -> list[ManifestRow]:
    """``n`` training concepts: parameters outside the held-out band, no held-out composition."""
    rng = random.Random(stable_seed(seed, "concepts", prefix))
    names = list(families or FAMILIES)
    banned = set(heldout_compositions(seed))
    combos = [f"{a}{COMPOSE}{b}" for a, b in itertools.permutations(names, 2) if f"{a}{COMPOSE}{b}" not in banned]
    rows = []
    for i in range(n):
        family = rng.choice(combos) if combos and rng.random() < COMPOSE_SHARE else names[i % len(names)]
        rows.append(_row(i, _draw(rng, family, heldout_values=False), prefix))
    return rows


def heldout_rows(n: int, seed: int = 0, prefix: str = "heldout") -> list[ManifestRow]:
    """``n`` held-out concepts: alternately a single family at held-out parameter values, and a held-out
    composition (its parameters anywhere in range)."""
    rng = random.Random(stable_seed(seed, "heldout", prefix))
    names, combos = list(FAMILIES), heldout_compositions(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            spec = _draw(rng, names[(i // 2) % len(names)], heldout_values=True)
        else:
            spec = _draw(rng, combos[(i // 2) % len(combos)], heldout_values=rng.random() < 0.5)
        rows.append(_row(i, spec, prefix))
    return rows


def write_concept_manifest(rows: Sequence[ManifestRow], uri: str) -> str:
    """Write procedural concept rows as a JSONL manifest (numbers as numbers); returns ``uri``."""
    return write_manifest(rows, uri)


def write_pairs(rows: Sequence[ManifestRow], folder: str, n: int = 8, size: int = 32, seed: int = 0) -> list[ManifestRow]:
    """Render each row's ``n`` source→target pairs as PNGs under ``folder/images/<id>/{source,target}/``
    and return the rows pointing at them (``image_dir``, relative to ``folder``)."""
    sources = source_images(n, size, stable_seed(seed, "pair-sources"))
    out = []
    for row in rows:
        targets = EditSpec.parse(row.attributes).apply(sources)
        for sub, batch in (("source", sources), ("target", targets)):
            d = Path(join(folder, "images", row.id, sub))
            d.mkdir(parents=True, exist_ok=True)
            for j, t in enumerate(batch):
                to_image(t).save(d / f"{j:03d}.png")
        out.append(row.model_copy(update={"image_dir": f"images/{row.id}"}))
    return out
