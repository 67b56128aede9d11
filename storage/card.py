"""The dataset card: one dataset, one recipe. Written once, at the first commit; checked before training.

``<dataset>/dataset_card.json`` fixes what makes rows one population: the engine, the base model's
fingerprint, the fine-tune config's fingerprint (only fields that change the weights: see
``recipe_fields``) and, from the first commit on, the layout. ``weightzoo build`` compares its own
recipe with the card before it loads anything and refuses a mismatch, naming the differing fields;
every commit checks again, so two builds racing with different recipes cannot both land rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from weightzoo.errors import CorruptShardError, RecipeMismatchError
from weightzoo.storage.fs import is_local, join, redact, write_bytes
from weightzoo.storage.ledger import Ledger

CARD = "dataset_card.json"


def recipe_fields(config: Any) -> dict[str, Any]:
    """The config fields that change the weights: every field but those the model lists as execution-only."""
    execution = set(getattr(type(config), "EXECUTION_FIELDS", ()))
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in execution}


def fingerprint(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Recipe:
    """What every row of one dataset shares. ``layout`` is empty until the first commit fixes it."""

    engine: str
    base_model: str
    config_fingerprint: str
    config: dict[str, Any] = field(default_factory=dict)
    layout: str = ""

    @classmethod
    def of(cls, engine: str, base_model: str, config: Any, layout: str = "") -> Recipe:
        fields = recipe_fields(config)
        return cls(engine, base_model, fingerprint(fields), fields, layout)

    @property
    def family(self) -> str:
        """The base's model family as its fingerprint names it (``sdxl-…``); SD 1.x/2.x bases have no prefix."""
        head, sep, _ = self.base_model.rpartition("-")
        return head if sep else "sd"

    def differences(self, other: Recipe) -> list[str]:
        """Human-readable differences (``name: card value ≠ this value``); empty when compatible."""
        out = [f"model family: {other.family} ≠ {self.family}"] if self.family != other.family else []
        out += [f"{k}: {getattr(other, k)} ≠ {getattr(self, k)}" for k in ("engine", "base_model")
                if getattr(self, k) != getattr(other, k)]
        if self.layout and other.layout and self.layout != other.layout:
            out.append(f"layout: {other.layout} ≠ {self.layout}")
        if self.config_fingerprint != other.config_fingerprint:
            keys = sorted(set(self.config) | set(other.config))
            out += [f"config.{k}: {other.config.get(k)!r} ≠ {self.config.get(k)!r}" for k in keys
                    if self.config.get(k) != other.config.get(k)] or ["config fingerprint"]
        return out


def read_card(ledger: Ledger) -> Recipe | None:
    """The dataset's recipe, or None for a dataset without a card yet (new, or from before cards)."""
    path = join(ledger.root, CARD)
    try:
        raw = ledger.fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        d = json.loads(raw)
        return Recipe(d["engine"], d["base_model"], d["config_fingerprint"], d.get("config", {}), d.get("layout", ""))
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptShardError(f"dataset card {redact(join(ledger.uri, CARD))} cannot be read ({e})") from e


def _write_card(ledger: Ledger, recipe: Recipe, first: bool) -> None:
    """Write the card; the first one locally with create-exclusive semantics (a racing first card loses and
    is then compared). On object stores the last writer wins and the re-check after writing decides."""
    body = {**asdict(recipe), "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    data = json.dumps(body, indent=2, sort_keys=True).encode()
    path = join(ledger.root, CARD)
    if not (first and is_local(ledger.fs)):
        write_bytes(ledger.fs, path, data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    ledger.fs.makedirs(ledger.root, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.link(tmp, path)  # fails if a card exists: never overwrite another build's first card
    except FileExistsError:
        pass
    finally:
        os.remove(tmp)


def write_card(ledger: Ledger, recipe: Recipe) -> None:
    """Overwrite the card (``verify --repair`` rebuilding an unreadable one from the commits' recipe)."""
    _write_card(ledger, recipe, first=False)


def check_recipe(ledger: Ledger, recipe: Recipe) -> Recipe | None:
    """Refuse ``recipe`` if the dataset's card says otherwise (before any training); returns the card."""
    card = read_card(ledger)
    if card is not None:
        diffs = recipe.differences(card)
        if diffs:
            raise RecipeMismatchError(
                f"dataset {redact(ledger.uri)} holds rows of another recipe ({'; '.join(diffs)}); "
                f"nothing was trained. Build this recipe into a new dataset URI, e.g. "
                f"{redact(ledger.uri)}-{recipe.config_fingerprint[:6]}"
            )
    return card


def fix_recipe(ledger: Ledger, recipe: Recipe) -> None:
    """At commit: check the card again (another build may have raced us) and write it if it is the first
    commit, or if an older card has no layout yet. ``recipe.layout`` must be set."""
    card = check_recipe(ledger, recipe)
    if card is None or not card.layout:
        _write_card(ledger, recipe if card is None else replace(card, layout=recipe.layout), first=card is None)
        check_recipe(ledger, recipe)  # a racing first commit of another recipe: the last card written wins
