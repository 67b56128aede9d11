"""A procedural world of "subjects" that a tiny text-to-image model can learn and pixel statistics can read.

A subject is one value of each attribute in ``ATTRIBUTES``: a flat shape of a saturated body colour,
plain or with horizontal grey stripes, small or large, centred on a flat background. Palettes are far
apart (every body colour, the stripe ink and every background differ by > 70 in RGB), so ``read`` can
label a picture from pixel statistics alone, no classifier: the background is the border's median
colour, the body is every pixel far from it, its colour the nearest palette entry, its shape the one
whose mask (at the body's centroid and area) overlaps it best, its size its area, stripes the share of
ink-grey pixels in it. Drawn without anti-aliasing, so ``read(render(s)) == s`` exactly.

Continuous traits (exact hues, a small offset of the centre) make two subjects with equal labels
distinct identities; ``jitter`` moves one identity's images a pixel or two so they differ.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

WORLD_RESOLUTION = 32  # pixels: small enough to pretrain on a CPU in minutes, large enough to read stripes

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "colour": ("red", "green", "blue", "yellow"),
    "pattern": ("plain", "striped"),
    "size": ("small", "large"),
    "background": ("white", "black", "purple"),
}
BODY: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 175, 60), "blue": (40, 80, 215), "yellow": (235, 215, 40),
}
GROUND: dict[str, tuple[int, int, int]] = {"white": (240, 240, 240), "black": (20, 20, 20), "purple": (130, 60, 160)}
INK = (128, 128, 128)  # the stripes: far from every body colour and every background
JITTER = 12  # per-channel spread of an identity's exact colours around the palette
HALF = {"small": 7.0, "large": 11.0}  # half-width of the shape in pixels at 32 px
STRIPE_PERIOD = 8  # pixels: four rows of ink, four of body (two latent rows each: a VAE and UNet keep them)
SQUARE = 0.9  # the square's half-side in h: about the circle's area (pi / 4 ~ 0.89²), so sizes stay comparable
TRIANGLE_UP, TRIANGLE_DOWN, TRIANGLE_W = 1.1, 0.9, 1.1  # apex above the centre, base below it, half the base; in h


@dataclass(frozen=True)
class Subject:
    """One identity: its labels and the continuous traits that make it this one subject."""

    labels: dict[str, str]
    body: tuple[int, int, int] = field(default=(0, 0, 0))
    ground: tuple[int, int, int] = field(default=(0, 0, 0))
    dx: float = 0.0  # centre offset in pixels at 32 px
    dy: float = 0.0


def nominal(labels: dict[str, str]) -> Subject:
    """The subject with exactly the palette's colours, centred."""
    return Subject(dict(labels), BODY[labels["colour"]], GROUND[labels["background"]])


def _jit(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in rgb)
    return r, g, b


def random_subject(rng: random.Random) -> Subject:
    """A subject with uniformly drawn labels and its own exact colours and centre."""
    labels = {name: rng.choice(values) for name, values in ATTRIBUTES.items()}
    return Subject(labels, _jit(BODY[labels["colour"]], rng), _jit(GROUND[labels["background"]], rng),
                   rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5))


def render(sub: Subject, size: int = WORLD_RESOLUTION, shift: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Draw ``sub`` (no anti-aliasing); ``shift`` moves it by pixels at 32 px (per-image jitter)."""
    s = size / 32.0
    cx, cy = size / 2 + s * (sub.dx + shift[0]), size / 2 + s * (sub.dy + shift[1])
    h = HALF[sub.labels["size"]] * s
    im = Image.new("RGB", (size, size), sub.ground)
    draw = ImageDraw.Draw(im)
    shape = sub.labels["shape"]
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=sub.body)
    elif shape == "square":
        k = h * SQUARE
        draw.rectangle((cx - k, cy - k, cx + k, cy + k), fill=sub.body)
    else:
        up, down, w = h * TRIANGLE_UP, h * TRIANGLE_DOWN, h * TRIANGLE_W
        draw.polygon([(cx, cy - up), (cx + w, cy + down), (cx - w, cy + down)], fill=sub.body)
    if sub.labels["pattern"] == "striped":
        arr = np.asarray(im).copy()
        body = np.all(arr == np.array(sub.body, dtype=np.uint8), axis=-1)
        rows = (np.arange(size)[:, None] // max(1, round(s * STRIPE_PERIOD / 2))) % 2 == 1
        arr[body & rows] = INK
        im = Image.fromarray(arr)
    return im


def jitter(rng: random.Random) -> tuple[float, float]:
    """A per-image shift of the subject: a pixel or two, so one identity's images differ."""
    return rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)


def caption(labels: dict[str, str], keep: set[str] | None = None) -> str:
    """``"a photo of a small red striped circle on white"``; attributes outside ``keep`` are left unsaid
    (a shape left unsaid is "subject"), so the base also learns what a vaguer prompt may draw."""
    keep = set(ATTRIBUTES) if keep is None else keep
    words = [labels[a] for a in ("size", "colour", "pattern") if a in keep and labels[a] != "plain"]
    words.append(labels["shape"] if "shape" in keep else "subject")
    text = "a photo of a " + " ".join(words)
    return text + (f" on {labels['background']}" if "background" in keep else "")


# Share of the frame between the largest small body (a square, 159 px at 32) and the smallest large one (a
# triangle, 266 px): size reads right whichever the shape.
LARGE_AREA = 0.2


# -- the reader --------------------------------------------------------------------------------------------


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = [float(np.linalg.norm(rgb - np.array(palette[n], dtype=np.float32))) for n in names]
    return names[int(np.argmin(d))]


_PIXEL_Y, _PIXEL_X = np.mgrid[0:WORLD_RESOLUTION, 0:WORLD_RESOLUTION].astype(np.float32) + 0.5  # pixel centres
# Each shape's area in units of h² and its centroid's offset below the centre in units of h, as render draws it.
_AREA = {"circle": np.pi, "square": (2 * SQUARE) ** 2, "triangle": 2 * TRIANGLE_W * (TRIANGLE_UP + TRIANGLE_DOWN) / 2}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": (2 * TRIANGLE_DOWN - TRIANGLE_UP) / 3}


def _template(shape: str, cx: float, cy: float, h: float) -> np.ndarray:
    """The mask ``render`` draws for ``shape`` of half-width ``h`` centred at (cx, cy), at the world's size."""
    dx, dy = _PIXEL_X - cx, _PIXEL_Y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= h * h
    if shape == "square":
        return (np.abs(dx) <= SQUARE * h) & (np.abs(dy) <= SQUARE * h)
    return (dy <= TRIANGLE_DOWN * h) & (np.abs(dx) <= TRIANGLE_W / (TRIANGLE_UP + TRIANGLE_DOWN) * (dy + TRIANGLE_UP * h))


def shape_fits(mask: np.ndarray) -> dict[str, float]:
    """IoU of the body mask with each shape of the same area and centroid: a blurred or slightly
    mis-sized body still overlaps its own shape best (a bounding box's fill is lost to one stray pixel)."""
    ys, xs = np.nonzero(mask)
    my, mx = ys.mean() + 0.5, xs.mean() + 0.5
    fits = {}
    for shape, area in _AREA.items():
        h = float(np.sqrt(len(ys) / area))
        t = _template(shape, mx, my - _CENTROID_DY[shape] * h, h)
        fits[shape] = float((t & mask).sum() / (t | mask).sum())
    return fits


def _shape(mask: np.ndarray) -> str:
    fits = shape_fits(mask)
    return max(fits, key=fits.__getitem__)


def _segment(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels (R, R, 3) at the world's resolution, the background (the border's median colour) and the
    body mask (pixels farther than 60 from it)."""
    arr = np.asarray(image.convert("RGB").resize((WORLD_RESOLUTION,) * 2, Image.Resampling.NEAREST), np.float32)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    return arr, bg, np.linalg.norm(arr - bg, axis=-1) > 60


def read(image: Image.Image) -> dict[str, str]:
    """The labels of a picture from pixel statistics (see the module docstring); works on generated
    pictures too, where colours are approximate: every decision is a nearest palette entry or a threshold
    halfway between the renderer's values."""
    arr, bg, mask = _segment(image)
    labels = {"background": _nearest(bg, GROUND)}
    if mask.sum() < 4:  # nothing drawn: a picture without a subject reads as none of them
        return labels | {"shape": "none", "colour": "none", "pattern": "none", "size": "none"}
    pixels = arr[mask]
    ink = np.linalg.norm(pixels - np.array(INK, np.float32), axis=-1) < 45
    body = pixels[~ink] if (~ink).sum() else pixels
    striped = ink.mean() > 0.25
    area = mask.sum() / (WORLD_RESOLUTION**2)
    return labels | {
        "colour": _nearest(np.median(body, axis=0), BODY), "pattern": "striped" if striped else "plain",
        "size": "large" if area > LARGE_AREA else "small", "shape": _shape(mask),
    }


def agreement(got: dict[str, str], want: dict[str, str]) -> float:
    """Share of ``want``'s attributes that ``got`` reads the same."""
    return sum(got.get(a) == v for a, v in want.items()) / max(1, len(want))


def is_valid(image: Image.Image) -> bool:
    """Whether a picture holds one readable subject: a background and a body each near a palette colour,
    and a body neither vanishing nor filling the frame (a sampled model that draws noise fails)."""
    arr, bg, mask = _segment(image)
    if not 0.03 <= mask.mean() <= 0.6:
        return False
    pixels = arr[mask]
    body = pixels[np.linalg.norm(pixels - np.array(INK, np.float32), axis=-1) >= 45]
    if len(body) == 0:
        return False
    near = [_palette_distance(bg, GROUND), _palette_distance(np.median(body, axis=0), BODY)]
    return near[0] < 50 and near[1] < 60


def _palette_distance(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> float:
    return min(float(np.linalg.norm(rgb - np.array(c, np.float32))) for c in palette.values())
