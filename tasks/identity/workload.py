"""What the identity engine (``diffusers-lora``) tells the rest of weightzoo besides how to train: its light
base check, its toy base and its demo rows (``contract.Engine.check_base``/``toy_base``/``demo_rows``).

Torch-free at import: the CLI checks a base with it before any server starts, and ``--help`` never
pays for torch. The toy base and the demo rows import their (torch) builders when called.
"""

from __future__ import annotations

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem, join
from weightzoo.tasks.identity import families

INDEX = "model_index.json"  # what makes a folder a diffusers pipeline (``save_pretrained`` writes it)


def check_base(base: str) -> None:
    """A diffusers pipeline of a supported family, told by its ``model_index.json`` alone (nothing loads): a
    file or no folder, no index, an index that does not parse, an unsupported pipeline class: one line."""
    families.detect(base)


def toy_base(out: str, *, seed: int = 0, family: str = "sd") -> str:
    """A tiny random-weights pipeline of ``family`` at ``out``, built from configs in code (nothing is
    downloaded); a folder that already holds one of that family is kept."""
    family = families.get(family).name  # an unknown family: one line naming the known ones
    fs, path = filesystem(str(out))
    if fs.exists(join(path, INDEX)):
        have = families.detect(str(out)).name
        if have != family:
            raise InputError(f"{out} already holds a {have} pipeline, not {family}: choose another folder")
        return str(out)
    from weightzoo.tasks.identity.tiny_bases import save_tiny_pipeline

    save_tiny_pipeline(out, family=family, seed=seed)
    return str(out)


def demo_rows(workdir: str, items: int, *, images_per_subject: int = 4, seed: int = 0) -> str:
    """``items`` synthetic subjects (procedural pictures with known attributes) as ``workdir/manifest.jsonl``
    and ``workdir/images/``; the same seed redraws the same subjects, so a rerun resumes."""
    from weightzoo.tasks.identity.synthetic import write_demo_manifest

    return write_demo_manifest(workdir, items, images_per_subject=images_per_subject, seed=seed)
