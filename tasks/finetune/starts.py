"""Starts: a LoRA file a row's training begins from instead of the shared init.

A manifest row's ``init`` names a diffusers LoRA file (``weightzoo init`` writes the best start the project
knows for a new concept; ``export`` and ``generate`` write files of the same format). It is read into the
batch's layout once the base is loaded and before any step trains: a file that is missing, not safetensors,
or not a LoRA of that layout fails its own row, named, and the other rows train.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem
from weightzoo.storage.layout import LORA_B, Layout
from weightzoo.storage.retry import describe
from weightzoo.tasks.finetune.contract import ItemResult
from weightzoo.tasks.finetune.driver import Prepared
from weightzoo.tasks.finetune.export import BAKED_SCALE

PREFIXES = ("unet.", "transformer.")  # what export writes for each model family (export.key_prefix)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (a JSON header after its 8-byte length)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def load_lora_vector(path: str, layout: Layout) -> torch.Tensor:
    """A diffusers/peft LoRA file → flat float32 vector of ``layout`` (unscaled A, B, as rows are stored).

    Accepts family-prefixed (``unet.``, ``transformer.``) or bare keys; a scale baked into ``lora_B`` by
    ``export_lora`` (recorded in the file's metadata) is divided out, so exported files read back exactly
    as their rows. Flattened in float32, not the storage dtype: reading a file must not round it to fp16.
    """
    from safetensors.torch import load as st_load

    fs, p = filesystem(path)
    data = fs.cat_file(p)
    try:
        baked = float(safetensors_metadata(data).get(BAKED_SCALE, "1.0"))
        tensors = st_load(data)
    except Exception as exc:  # any parse error of untrusted bytes: not a safetensors file
        raise InputError(f"{path} is not a safetensors LoRA file ({describe(exc)})") from None
    state = {}
    for key, t in tensors.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = t.float() / baked if key.endswith(LORA_B) else t.float()
    try:
        return replace(layout, dtype="float32").flatten(state)  # a fixed A in the file is checked, not stored
    except (KeyError, ValueError) as e:
        raise InputError(f"{path} is not a LoRA of this layout: {e}") from None


def with_starts(prepare: Callable[[list[Any]], Prepared], files: Mapping[str, str],
                starts: dict[str, torch.Tensor]) -> Callable[[list[Any]], Prepared]:
    """``prepare`` that then reads each row's start (``files``: id → LoRA URI) into ``starts`` in the batch's
    layout; a row whose file does not read is a failure of that row, before anything trains."""
    def prepared(items: list[Any]) -> Prepared:
        prep = prepare(items)
        for item in items:
            if item.id in files and item.id not in prep.failures:
                try:
                    starts[item.id] = load_lora_vector(files[item.id], prep.layout)
                except (InputError, OSError) as exc:  # InputError names the file itself
                    why = str(exc) if isinstance(exc, InputError) else f"init {files[item.id]}: {describe(exc)}"
                    prep.failures[item.id] = ItemResult(item.id, False, None, None, 0, 0.0, why)
        return prep
    return prepared
