"""Identities in the world: a manifest of subjects with known labels, sampling with or without a row's LoRA
through diffusers' own ``load_lora_weights``, reader scores, and a preview grid to look at.

Identity ``i`` depends only on ``(seed, i)``, never on ``n``: growing a dataset keeps its first identities.
"""

from __future__ import annotations

import io
import random
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem, join, write_bytes
from weightzoo.storage.layout import Layout
from weightzoo.tasks.finetune.export import export_lora
from weightzoo.tasks.finetune.readers import write_manifest
from weightzoo.tasks.finetune.row import ManifestRow
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.world.config import GUIDANCE, SAMPLE_STEPS, WORLD_FINETUNE
from weightzoo.tasks.world.render import WORLD_RESOLUTION, agreement, jitter, random_subject, read, render

PROMPT = "a photo of sks subject"  # "sks": a rare token (bytes in the world tokenizer, no meaning to the base)
CLASS_PROMPT = "a photo of a subject"  # what the base draws for it: any subject (captions drop attributes)


def world_finetune_config(**overrides) -> FinetuneConfig:
    """The world's DreamBooth-LoRA settings (``WORLD_FINETUNE``) with ``overrides``."""
    return FinetuneConfig(**(WORLD_FINETUNE | overrides))


def identity_id(index: int) -> str:
    return f"world-{index:05d}"


def make_world_identities(out_dir: str, n: int, images_per_identity: int = 4, seed: int = 0, first: int = 0,
                          size: int = WORLD_RESOLUTION) -> list[ManifestRow]:
    """Draw identities ``first .. first+n-1`` into ``out_dir/images/<id>/<k>.png``; rows carry their labels as
    ``attributes`` and image paths relative to ``out_dir``."""
    if n < 0 or images_per_identity < 1:
        raise InputError(f"need n >= 0 and images_per_identity >= 1, got {n}, {images_per_identity}")
    fs, root = filesystem(out_dir)
    rows = []
    for i in range(first, first + n):
        rng = random.Random(f"world-identity:{seed}:{i}")
        sub = random_subject(rng)
        fs.makedirs(join(root, "images", identity_id(i)), exist_ok=True)
        images = [f"images/{identity_id(i)}/{k}.png" for k in range(images_per_identity)]
        for rel in images:
            write_bytes(fs, join(root, rel), png_bytes(render(sub, size, jitter(rng))))
        rows.append(ManifestRow(id=identity_id(i), kind="identity", prompt=PROMPT, class_prompt=CLASS_PROMPT,
                                images=images, attributes=sub.labels))
    return rows


def write_world_manifest(out_dir: str, n: int, images_per_identity: int = 4, seed: int = 0) -> str:
    """``make_world_identities`` and ``out_dir/manifest.jsonl``; returns the manifest's path."""
    rows = make_world_identities(out_dir, n, images_per_identity, seed)
    return write_manifest(rows, join(str(out_dir), "manifest.jsonl"))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# -- sampling --------------------------------------------------------------------------------------------------


@contextmanager
def lora_loaded(pipe: StableDiffusionPipeline, weights: torch.Tensor | np.ndarray | None, layout: Layout,
                hparams: dict) -> Iterator[StableDiffusionPipeline]:
    """``pipe`` with one flat LoRA row exported and loaded by ``load_lora_weights`` (the path users take),
    unloaded afterwards; ``weights=None`` leaves the base as it is."""
    if weights is None:
        yield pipe
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = export_lora(torch.as_tensor(weights).to(layout.torch_dtype), layout, hparams, tmp)
        pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name)
    try:
        yield pipe
    finally:
        pipe.unload_lora_weights()


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompt: str, n: int, seed: int = 0, steps: int = SAMPLE_STEPS,
             guidance: float = GUIDANCE) -> list[Image.Image]:
    """``n`` pictures of ``prompt``; picture j from seed ``seed + j``."""
    gens = [torch.Generator("cpu").manual_seed(seed + j) for j in range(n)]
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return pipe([prompt] * n, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                generator=gens, output_type="pil").images


def score(images: Sequence[Image.Image], labels: dict[str, str]) -> float:
    """Mean reader agreement of ``images`` with ``labels`` (1.0: every attribute of every picture read right)."""
    return float(np.mean([agreement(read(im), labels) for im in images])) if images else 0.0


# -- the preview grid -------------------------------------------------------------------------------------------


def _strip(images: Sequence[Image.Image], title: str, cell: int, width: int) -> Image.Image:
    out = Image.new("RGB", (width, cell + 14), (255, 255, 255))
    ImageDraw.Draw(out).text((2, 1), title, fill=(0, 0, 0))
    for j, im in enumerate(images):
        out.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (j * (cell + 4), 14))
    return out


def strip_image(images: Sequence[Image.Image], title: str, cell: int = 96) -> Image.Image:
    """``images`` side by side under ``title``."""
    return _strip(images, title, cell, max(1, len(images)) * (cell + 4))


def preview_grid(pipe: StableDiffusionPipeline, row: ManifestRow, weights: torch.Tensor | np.ndarray,
                 layout: Layout, hparams: dict, training: Sequence[Image.Image], out_png: str, n: int = 4,
                 seed: int = 0, cell: int = 96) -> dict[str, float]:
    """Write a PNG of three strips (the prompt without the LoRA, with it, the training images if any) and return
    the reader's agreement with the row's labels without and with the LoRA."""
    plain = generate(pipe, row.prompt, n, seed)
    with lora_loaded(pipe, weights, layout, hparams):
        tuned = generate(pipe, row.prompt, n, seed)
    width = max(n, len(training)) * (cell + 4)
    strips = [_strip(plain, f"'{row.prompt}' without LoRA", cell, width),
              _strip(tuned, f"with {row.id}'s LoRA", cell, width)]
    strips += [_strip(training, "training images", cell, width)] if training else []
    grid = Image.new("RGB", (width, sum(s.height for s in strips)), (255, 255, 255))
    for k, s in enumerate(strips):
        grid.paste(s, (0, k * s.height))
    fs, path = filesystem(out_png)
    write_bytes(fs, path, png_bytes(grid))
    labels = dict(row.attributes)
    return {"without": score(plain, labels), "with": score(tuned, labels)}
