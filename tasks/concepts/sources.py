"""Source images for editing concepts, all offline: random crops of real photos plus procedural scenes.

The photos are those installed packages ship: scikit-learn's two sample photos (``china.jpg``,
``flower.jpg``) and matplotlib's ``grace_hopper.jpg``; whichever are installed are used. Crops of
different places and scales give varied natural textures and colours. Procedural scenes (gradients,
discs, stripes) add flat regions and hard edges, which spatial edits need. Everything is seeded, so
the same (seed, n, size) always gives the same images.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# A third of the images are procedural: enough hard edges and flat colours, most still natural.
PROCEDURAL_SHARE = 1 / 3


def _photo_paths() -> list[Path]:
    """The sample photos of installed packages (none of them downloads anything)."""
    paths: list[Path] = []
    try:
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
        paths += sorted(folder.glob("*.jpg"))
    except ImportError:
        pass
    try:
        import matplotlib

        paths += [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    except ImportError:
        pass
    return [p for p in paths if p.is_file()]


@functools.cache
def photos() -> tuple[torch.Tensor, ...]:
    """Every available photo as (3, H, W) float in [0, 1] (read once per process)."""
    out = []
    for path in _photo_paths():
        with Image.open(path) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1))
    return tuple(out)


def _crop(photo: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """A random square crop (1/8 to 1/2 of the short side), randomly flipped, resized to ``size``."""
    _, h, w = photo.shape
    side = int(min(h, w) * (0.125 + 0.375 * torch.rand((), generator=g).item()))
    y = int(torch.randint(0, h - side + 1, (), generator=g))
    x = int(torch.randint(0, w - side + 1, (), generator=g))
    crop = photo[:, y : y + side, x : x + side][None]
    if torch.rand((), generator=g) < 0.5:
        crop = crop.flip(-1)
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _scene(size: int, g: torch.Generator) -> torch.Tensor:
    """A procedural scene: a two-colour gradient, a few coloured discs, optional stripes."""
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    angle = 2 * math.pi * r(()).item()
    t = (math.cos(angle) * xx + math.sin(angle) * yy).clamp(0, 1)
    img = torch.lerp(r(3, 1, 1), r(3, 1, 1), t[None])
    for _ in range(int(torch.randint(1, 4, (), generator=g))):
        cy, cx, rad = r(()).item(), r(()).item(), 0.08 + 0.25 * r(()).item()
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < rad**2)[None]
        img = torch.where(disc, r(3, 1, 1), img)
    if r(()).item() < 0.5:
        stripes = (torch.sin(xx * (6 + 10 * r(()).item()) * math.pi) > 0)[None]
        img = torch.where(stripes, img * 0.6, img)
    return img


def source_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) float images in [0, 1]: photo crops and procedural scenes, seeded."""
    g = torch.Generator().manual_seed(seed)
    pool = photos()
    out = []
    for _ in range(n):
        procedural = not pool or torch.rand((), generator=g).item() < PROCEDURAL_SHARE
        out.append(_scene(size, g) if procedural else _crop(pool[int(torch.randint(0, len(pool), (), generator=g))], size, g))
    return torch.stack(out).clamp(0, 1) if out else torch.empty(0, 3, size, size)


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL image as (3, size, size) float in [0, 1] (resized with antialiasing if needed)."""
    t = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return t.clamp(0, 1)


def to_image(t: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] → 8-bit RGB PIL image."""
    return Image.fromarray((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
