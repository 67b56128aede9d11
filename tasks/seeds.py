"""Stable seeds: the same parts give the same seed in every process (Python's ``hash()`` is salted)."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 60-bit seed derived from ``parts`` (e.g. a config seed, a purpose, an item id)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)
