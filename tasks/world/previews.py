"""Pictures of a dataset's rows: a preview grid per row (the prompt without the row's LoRA, with it, and its
training images when known) and a single preview PNG next to an exported LoRA.

Only a base that draws something (a world base: ``world_base.json`` beside its model) gets pictures; on the
random-weights toy base they would be noise, so callers ask ``can_draw`` first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from PIL import Image

from weightzoo.storage.dataset import Dataset
from weightzoo.storage.fs import filesystem, join, write_bytes
from weightzoo.tasks.finetune.images import load_images
from weightzoo.tasks.finetune.row import ManifestRow
from weightzoo.tasks.identity.base_model import load_base
from weightzoo.tasks.world.base import INFO_FILE
from weightzoo.tasks.world.identities import generate, png_bytes, preview_grid, strip_image

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


def _file_pictures(pipe, lora_path: str, prompt: str, n: int, seed: int) -> list:
    """``n`` pictures of ``prompt`` with the LoRA file loaded as users load it (``load_lora_weights``), then unloaded."""
    folder, name = os.path.split(lora_path)
    pipe.load_lora_weights(folder or ".", weight_name=name)
    try:
        return generate(pipe, prompt, n, seed)
    finally:
        pipe.unload_lora_weights()


def _stacked(strips: Sequence) -> Image.Image:
    """Strips one under another, on white."""
    grid = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (255, 255, 255))
    for k, strip in enumerate(strips):
        grid.paste(strip, (0, k * strip.height))
    return grid


def lora_file_preview(base_uri: str, lora_path: str, prompt: str, n: int = PREVIEWS, seed: int = 0) -> str | None:
    """``n`` pictures of ``prompt`` from the base with the LoRA file at ``lora_path`` loaded as users load it
    (``load_lora_weights``), side by side in ``<stem>.preview.png`` beside it. ``None`` (nothing written)
    when the base is no world base: its pictures would be noise."""
    if not can_draw(base_uri):
        return None
    pipe = load_base(base_uri)
    pipe.set_progress_bar_config(disable=True)
    images = _file_pictures(pipe, lora_path, prompt, n, seed)
    name = os.path.basename(lora_path)
    out = preview_path(lora_path)
    fs, path = filesystem(out)
    write_bytes(fs, path, png_bytes(strip_image(images, f"'{prompt}' with {name}")))
    return out


def edit_preview(base_uri: str, weights, layout, hparams: dict, edited_path: str, prompt: str, edit: str,
                 n: int = PREVIEWS, seed: int = 0) -> str | None:
    """The row before (its own LoRA) and after the edit (the written file, loaded as users load it), as two
    strips of the same seeds in ``<stem>.preview.png`` beside the edited file; ``None`` on a base that
    cannot draw."""
    if not can_draw(base_uri):
        return None
    from weightzoo.tasks.world.identities import lora_loaded

    pipe = load_base(base_uri)
    with lora_loaded(pipe, weights, layout, hparams):
        before = generate(pipe, prompt, n, seed)
    after = _file_pictures(pipe, edited_path, prompt, n, seed)
    out = preview_path(edited_path)
    fs, path = filesystem(out)
    write_bytes(fs, path, png_bytes(_stacked([strip_image(before, "before"), strip_image(after, f"after: {edit}")])))
    return out


TRAVERSAL = "traversal.png"


def traversal_grid(base_uri: str, sub, components: int = 4, stds: Sequence[float] = (-2.0, 0.0, 2.0),
                   seed: int = 0) -> str | None:
    """``<subspace>/traversal.png``: one row per top component, drawn at each of ``stds`` dataset std along it
    (every other coefficient at its mean), the same seed in every cell: how researchers read a subspace.
    ``None`` on a base that cannot draw."""
    if not can_draw(base_uri):
        return None
    import torch

    from weightzoo.tasks.subspace.w2w import coefficient_gaussians, subspace_hparams
    from weightzoo.tasks.world.identities import lora_loaded

    pipe, hparams = load_base(base_uri), subspace_hparams(sub)
    prompt = sub.coords_table().column("prompt")[0].as_py()
    mu, sigma = coefficient_gaussians(sub)
    strips = []
    for i in range(min(components, sub.k)):
        cells = []
        for s in stds:
            c = mu.clone()
            c[i] += s * sigma[i]
            with lora_loaded(pipe, sub.to_weights(c).to(torch.float32), sub.layout, hparams):
                cells += generate(pipe, prompt, 1, seed)
        strips.append(strip_image(cells, f"component {i + 1} at {', '.join(f'{s:+g}' for s in stds)} std"))
    out = join(sub.uri, TRAVERSAL)
    fs, path = filesystem(out)
    write_bytes(fs, path, png_bytes(_stacked(strips)))
    return out


def preview_path(lora_path: str) -> str:
    """Where a LoRA file's preview goes: beside it, ``<stem>.preview.png``."""
    return lora_path.rsplit(".", 1)[0] + ".preview.png"


CARD_SECTION = "## Previews"


def card_previews(base_uri: str, dataset_uri: str, card_dir: str, limit: int = 16) -> list[dict]:
    """Preview grids of the first ``limit`` rows in ``card_dir/previews/`` and a "Previews" section in the
    card's README.md that shows them (replacing the section a previous publish wrote)."""
    grids = row_previews(base_uri, dataset_uri, join(card_dir, "previews"), limit=limit)
    lines = [CARD_SECTION, "", f"The base ({os.path.basename(str(base_uri).rstrip('/'))}) with and without each row's LoRA, on the row's prompt "
             f"(first {len(grids)} rows).", ""]
    lines += [f"**{g['id']}** `{g['prompt']}`\n\n![{g['id']}](previews/{g['id']}.png)\n" for g in grids]
    fs, readme = filesystem(join(card_dir, "README.md"))
    card = fs.cat_file(readme).decode() if fs.exists(readme) else ""
    card = card.split("\n" + CARD_SECTION + "\n", 1)[0].rstrip("\n")
    write_bytes(fs, readme, (card + "\n\n" + "\n".join(lines)).encode())
    return grids
