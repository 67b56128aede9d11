"""Synthetic subjects: procedurally drawn identities with known attribute labels.

Each subject is a simple face (a coloured head of some shape, two eyes, a mouth, maybe a hat or
glasses) on a light or dark background. Its attributes come from the small discrete sets in
``ATTRIBUTES``, so an edit direction fitted on the weights (e.g. "colour: red -> blue") can be
checked against ground truth. Continuous per-subject traits (head size, eye spacing, exact hues,
tilt) make subjects with equal labels still distinct, and per-image jitter in position, scale and
rotation makes one subject's images differ while sharing its identity.

Subject ``i`` depends only on ``(seed, i)``, never on ``n``: growing a demo keeps its first subjects.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem, is_local, join
from weightzoo.tasks.finetune.readers import write_manifest
from weightzoo.tasks.finetune.row import ManifestRow

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "colour": ("red", "green", "blue", "yellow"),
    "background": ("light", "dark"),
    "accessory": ("none", "hat", "glasses"),
}
# Nominal RGB of each label; subjects vary around these by at most COLOUR_JITTER per channel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 40),
    "green": (45, 165, 60),
    "blue": (45, 75, 205),
    "yellow": (230, 200, 45),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"light": (232, 232, 228), "dark": (32, 32, 38)}
COLOUR_JITTER = 15
HAT_COLOUR = (125, 60, 160)  # far from every face colour, so colour labels stay readable from pixels
INK = (15, 15, 15)  # eyes, mouth, glasses
PNG_COMPRESS_LEVEL = 1  # tiny images: level 1 writes much faster than the default and barely larger

_ROT_JITTER_DEG = 12.0
_SHIFT_JITTER = 3.0  # pixels at size 64
_SCALE_JITTER = 0.08


def subject_id(index: int) -> str:
    return f"subject-{index:05d}"


def _rng(seed: int, index: int) -> random.Random:
    """A generator for one subject: a string seed is hashed with SHA-512, so it is stable across runs and hosts."""
    return random.Random(f"weightzoo-synthetic:{seed}:{index}")


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in rgb)
    return r, g, b


@dataclass(frozen=True)
class _Subject:
    """A subject's labels and the continuous traits that make it one particular individual."""

    labels: dict[str, str]
    face: tuple[int, int, int]
    bg: tuple[int, int, int]
    radius: float  # pixels at size 64
    eye_gap: float
    eye_y: float
    mouth: float
    tilt: float  # degrees
    cx: float
    cy: float


def _subject(rng: random.Random) -> _Subject:
    labels = {name: rng.choice(values) for name, values in ATTRIBUTES.items()}
    return _Subject(
        labels=labels,
        face=_jitter(COLOURS[labels["colour"]], rng),
        bg=_jitter(BACKGROUNDS[labels["background"]], rng),
        radius=rng.uniform(12.0, 15.5),
        eye_gap=rng.uniform(7.0, 10.5),
        eye_y=rng.uniform(-2.0, 1.0),
        mouth=rng.uniform(3.0, 8.0),
        tilt=rng.uniform(-8.0, 8.0),
        cx=rng.uniform(-2.0, 2.0),
        cy=rng.uniform(1.0, 4.0),  # heads sit a little low, leaving room for a hat
    )


def _draw(sub: _Subject, rng: random.Random, size: int) -> Image.Image:
    """One image of a subject, with fresh position / scale / rotation jitter from ``rng``."""
    s = size / 64.0
    scale = s * (1.0 + rng.uniform(-_SCALE_JITTER, _SCALE_JITTER))
    angle = math.radians(sub.tilt + rng.uniform(-_ROT_JITTER_DEG, _ROT_JITTER_DEG))
    cx = size / 2 + s * (sub.cx + rng.uniform(-_SHIFT_JITTER, _SHIFT_JITTER))
    cy = size / 2 + s * (sub.cy + rng.uniform(-_SHIFT_JITTER, _SHIFT_JITTER))
    cos, sin = math.cos(angle), math.sin(angle)
    line = max(1, round(scale))

    def at(x: float, y: float) -> tuple[float, float]:
        """Face coordinates (pixels at size 64, y down, origin at the head's centre) to image pixels."""
        return cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)

    def ring(x: float, y: float, r: float) -> tuple[float, float, float, float]:
        px, py = at(x, y)
        return px - r * scale, py - r * scale, px + r * scale, py + r * scale

    r, shape, accessory = sub.radius, sub.labels["shape"], sub.labels["accessory"]
    im = Image.new("RGB", (size, size), sub.bg)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse(ring(0, 0, r), fill=sub.face)
    elif shape == "square":
        h = r * 0.9
        draw.polygon([at(-h, -h), at(h, -h), at(h, h), at(-h, h)], fill=sub.face)
    else:  # an upward triangle, large enough that the eyes and mouth fit inside
        big = r * 1.35
        draw.polygon([at(big * math.cos(a), big * math.sin(a)) for a in map(math.radians, (-90, 30, 150))],
                     fill=sub.face)

    gap = sub.eye_gap / 2
    for side in (-1, 1):
        draw.ellipse(ring(side * gap, sub.eye_y, 1.6), fill=INK)
    draw.line([at(-sub.mouth / 2, r * 0.42), at(sub.mouth / 2, r * 0.42)], fill=INK, width=line)

    if accessory == "hat":
        top = -r * (1.2 if shape == "triangle" else 0.8)
        crown = top - r * 0.55
        draw.polygon([at(-r * 0.6, top), at(r * 0.6, top), at(r * 0.45, crown), at(-r * 0.45, crown)], fill=HAT_COLOUR)
        draw.line([at(-r * 0.95, top), at(r * 0.95, top)], fill=HAT_COLOUR, width=2 * line)
    elif accessory == "glasses":
        for side in (-1, 1):
            draw.ellipse(ring(side * gap, sub.eye_y, 3.6), outline=INK, width=line)
        draw.line([at(-gap + 3.6, sub.eye_y), at(gap - 3.6, sub.eye_y)], fill=INK, width=line)
    return im


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def make_subjects(
    out_dir: str, n: int, images_per_subject: int = 4, seed: int = 0, size: int = 64
) -> list[ManifestRow]:
    """Draw ``n`` subjects into ``out_dir/images/<id>/<k>.png`` and return their manifest rows.

    Rows carry image paths relative to ``out_dir`` (where ``write_demo_manifest`` puts the manifest)
    and the subject's labels as ``attributes``. Deterministic in ``seed``; about 1 ms per subject at
    64 px with 4 images. Overwrites images already there.
    """
    if n < 0 or images_per_subject < 1 or size < 16:
        raise InputError(f"need n >= 0, images_per_subject >= 1 and size >= 16, got {n}, {images_per_subject}, {size}")
    fs, root = filesystem(out_dir)
    # Local disk skips fsspec's file objects: a quarter of the run time for thousands of tiny files.
    put = (lambda path, data: Path(path).write_bytes(data)) if is_local(fs) else fs.pipe_file
    rows = []
    for i in range(n):
        rng = _rng(seed, i)
        sub = _subject(rng)
        sid = subject_id(i)
        fs.makedirs(join(root, "images", sid), exist_ok=True)
        images = [f"images/{sid}/{k}.png" for k in range(images_per_subject)]
        for rel in images:
            put(join(root, rel), _png(_draw(sub, rng, size)))
        rows.append(ManifestRow(id=sid, kind="identity", prompt="sks person", class_prompt="person",
                                images=images, attributes=sub.labels))
    return rows


def write_demo_manifest(
    out_dir: str, n: int, images_per_subject: int = 4, seed: int = 0, size: int = 64
) -> str:
    """Draw ``n`` subjects with ``make_subjects`` and write ``out_dir/manifest.jsonl``; returns its path."""
    rows = make_subjects(out_dir, n, images_per_subject=images_per_subject, seed=seed, size=size)
    return write_manifest(rows, join(str(out_dir), "manifest.jsonl"))
