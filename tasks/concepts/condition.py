"""The structured condition of the weight generator: attributes as numbers, not as text.

For editing concepts the attributes *are* the concept: ``{"family": "sepia+blur", "strength": "0.7",
"radius": "1.2"}``. Text would make 0.7 and 0.75 two unrelated token strings; here every attribute
whose training values are all numbers becomes a feature ``2 (x - lo) / (hi - lo) - 1`` (plus a presence
flag), so an unseen value between seen ones is an interpolation. Every other attribute is categorical:
a multi-hot over its ``+``-separated parts, so an unseen *composition* of seen families is encodable,
while a part never seen in training is refused, naming the valid ones (the generator could only guess).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from weightzoo.errors import InputError

PART = "+"


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class StructuredCondition:
    """Valid categorical parts and numeric ranges, as seen in the training rows; encodes attributes."""

    categorical: dict[str, list[str]]
    numeric: dict[str, tuple[float, float]]

    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, object]]) -> StructuredCondition:
        keys = sorted({k for r in rows for k in r})
        numeric, categorical = {}, {}
        for k in keys:
            values = [r[k] for r in rows if k in r]
            nums = [_float(v) for v in values]
            if all(x is not None for x in nums):
                numeric[k] = (min(nums), max(nums))  # type: ignore[type-var]
            else:
                categorical[k] = sorted({p.strip() for v in values for p in str(v).split(PART)})
        return cls(categorical, numeric)

    @property
    def dim(self) -> int:
        return sum(len(v) for v in self.categorical.values()) + 2 * len(self.numeric)

    def check(self, attributes: Mapping[str, object]) -> None:
        """Refuse attributes the generator never saw: unknown keys, unseen categorical parts, non-numbers."""
        known = set(self.categorical) | set(self.numeric)
        unknown = sorted(set(attributes) - known)
        if unknown:
            raise InputError(f"unknown attribute(s) {unknown}; the model was trained on {sorted(known)}")
        for k, valid in self.categorical.items():
            if k not in attributes:
                raise InputError(f"attribute {k!r} is required (one of {', '.join(valid)})")
            bad = [p for p in (q.strip() for q in str(attributes[k]).split(PART)) if p not in valid]
            if bad:
                raise InputError(f"{k} {bad[0]!r} was never seen in training; valid {k} values: {', '.join(valid)}"
                                 f" (or several joined by '{PART}')")
        for k in self.numeric:
            if k in attributes and _float(attributes[k]) is None:
                raise InputError(f"attribute {k!r} must be a number, got {attributes[k]!r}")

    def encode(self, attributes: Mapping[str, object]) -> torch.Tensor:
        """(dim,) float features of ``attributes`` (checked first)."""
        self.check(attributes)
        out: list[float] = []
        for k, valid in self.categorical.items():
            parts = {p.strip() for p in str(attributes[k]).split(PART)}
            out += [1.0 if v in parts else 0.0 for v in valid]
        for k, (lo, hi) in self.numeric.items():
            x = _float(attributes.get(k))
            out += [0.0, 0.0] if x is None else [1.0, 2 * (x - lo) / (hi - lo) - 1 if hi > lo else 0.0]
        return torch.tensor(out)

    def encode_many(self, rows: Sequence[Mapping[str, object]]) -> torch.Tensor:
        return torch.stack([self.encode(r) for r in rows]) if rows else torch.empty(0, self.dim)

    def to_json(self) -> bytes:
        return json.dumps({"categorical": self.categorical, "numeric": self.numeric}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: str | bytes) -> StructuredCondition:
        d = json.loads(data)
        return cls({k: list(v) for k, v in d["categorical"].items()}, {k: tuple(v) for k, v in d["numeric"].items()})
