"""Tokenizers for the offline bases, written from code: nothing is downloaded.

CLIP's byte-level BPE with an empty merges file tokenises any prompt byte by byte; the world base adds
merges for its own words (tasks/world/base.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_byte_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (empty merges): tiny, offline, and handles any prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
