"""Pictures of a dataset's rows: a preview grid per row (the prompt without the row's LoRA, with it, and its
training images when known) and a single preview PNG next to an exported LoRA.

Only a base that draws something (a world base: ``world_base.json`` beside its model) gets pictures; on the
random-weights toy base they would be noise, so callers ask ``can_draw`` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from weightzoo.storage.dataset import Dataset
from weightzoo.storage.fs import filesystem, join, write_bytes
from weightzoo.storage.layout import Layout
from weightzoo.tasks.finetune.base_model import load_base
from weightzoo.tasks.finetune.images import load_images
from weightzoo.tasks.finetune.row import ManifestRow
from weightzoo.tasks.world.base import INFO_FILE
from weightzoo.tasks.world.identities import generate, lora_loaded, png_bytes, preview_grid, strip_image

PREVIEWS = 4  # pictures per strip


def can_draw(base_uri: str) -> bool:
    """Whether ``base_uri`` is a world base (the only kind whose pictures show what a LoRA learnt)."""
    fs, path = filesystem(join(str(base_uri), INFO_FILE))
    return fs.exists(path)


def row_previews(base_uri: str, dataset_uri: str, out_dir: str, manifest: Sequence[ManifestRow] = (),
                 manifest_dir: str | None = None, limit: int = 16) -> list[dict]:
    """A grid PNG ``out_dir/<id>.png`` for each of the first ``limit`` committed rows; a row found in
    ``manifest`` also shows its training images and its reader scores. Returns one record per grid."""
    ds = Dataset(dataset_uri)
    pipe = load_base(base_uri)
    pipe.set_progress_bar_config(disable=True)
    rows = {r.id: r for r in manifest}
    out = []
    for item in ds.ids[:limit]:
        meta, w = ds.row(item)
        row = rows.get(item) or ManifestRow(id=item, kind=meta.get("kind") or "identity", prompt=meta["prompt"],
                                            attributes=meta.get("attributes") or {})
        training = load_images(row, manifest_dir) if item in rows and manifest_dir else []
        path = join(out_dir, f"{item}.png")
        scores = preview_grid(pipe, row, w, ds.layout, meta["hparams"], training, path, n=PREVIEWS)
        out.append({"id": item, "prompt": row.prompt, "png": path, **(scores if row.attributes else {})})
    return out


def lora_preview(base_uri: str, weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict, prompt: str,
                 out_png: str, n: int = PREVIEWS, seed: int = 0) -> str:
    """``n`` pictures of ``prompt`` from the base with this LoRA loaded, side by side, as ``out_png``."""
    pipe = load_base(base_uri)
    pipe.set_progress_bar_config(disable=True)
    with lora_loaded(pipe, weights, layout, hparams):
        images = generate(pipe, prompt, n, seed)
    fs, path = filesystem(out_png)
    write_bytes(fs, path, png_bytes(strip_image(images, f"'{prompt}'")))
    return out_png


def preview_path(lora_path: str) -> str:
    """Where a LoRA file's preview goes: beside it, ``<stem>.preview.png``."""
    p = Path(lora_path)
    return str(p.with_name(p.stem + ".preview.png")) if "://" not in lora_path else lora_path.rsplit(".", 1)[0] + ".preview.png"
