"""What the edit engine (``edit-lora``) tells the rest of weightzoo besides how to train: its light base check,
its toy base and its demo rows (``contract.Engine.check_base``/``toy_base``/``demo_rows``).

Torch-free at import (``base.py`` and ``zoo.py`` import torch): the CLI checks a base with it before any
server starts. The toy base and the demo rows import their builders when called.
"""

from __future__ import annotations

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem, join, read_index

# The edit base's two files (tasks/concepts/base.py's CONFIG_NAME and WEIGHTS_NAME; that module imports torch).
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
# The edit base learns general editing features in about a minute on 2 cores.
TOY_BASE_STEPS = 200


def check_base(base: str) -> None:
    """An edit base: ``config.json`` that parses and names its shape, beside ``model.safetensors`` (nothing loads)."""
    card = read_index(base, CONFIG_NAME, "edit base")
    fs, path = filesystem(str(base))
    if not isinstance(card, dict) or "config" not in card or not fs.exists(join(path, WEIGHTS_NAME)):
        raise InputError(f"{base} is no edit base ({CONFIG_NAME} with 'config' and {WEIGHTS_NAME})")


def toy_base(out: str, *, seed: int = 0, steps: int = TOY_BASE_STEPS) -> str:
    """The small image-to-image base at ``out``, pretrained ``steps`` steps offline on procedural edits;
    kept when ``out`` already holds one."""
    from weightzoo.tasks.concepts.base import make_base

    return make_base(str(out), steps, seed=seed)


def demo_rows(workdir: str, items: int, *, seed: int = 0) -> str:
    """``items`` procedural editing concepts as ``workdir/manifest.jsonl`` (their image pairs are drawn
    from each spec when trained); deterministic, so a rerun resumes."""
    from weightzoo.tasks.concepts.zoo import concept_rows, write_concept_manifest

    return write_concept_manifest(concept_rows(items, seed=seed), join(str(workdir), "manifest.jsonl"))
