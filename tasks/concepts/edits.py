"""Edit families: deterministic image edits with numeric parameters, each with a text description.

An editing *concept* is one family at fixed parameter values ("sepia tone, strength 0.7"), or a
composition of two families applied in order (``family = "sepia+blur"``). Parameter names are unique
across families, so a composition's parameters are simply the union of its parts'.

Every edit maps a float batch ``(n, 3, H, W)`` in [0, 1] to the same shape, with plain torch ops (no
randomness), so a concept's target images are a pure function of its source images and its spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Images = torch.Tensor
COMPOSE = "+"  # "sepia+blur": sepia first, then blur


@dataclass(frozen=True)
class Param:
    """A numeric parameter's valid range; ``integer`` ones are rounded before use."""

    lo: float
    hi: float
    integer: bool = False


@dataclass(frozen=True)
class Family:
    """One kind of edit: its parameters, how it reads as text, and the edit itself."""

    name: str
    kind: str  # "colour" or "spatial"
    params: Mapping[str, Param]
    describe: Callable[[Mapping[str, float]], str]
    apply: Callable[..., Images]


def _grey(x: Images) -> Images:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _matrix(x: Images, m: torch.Tensor) -> Images:
    return torch.einsum("ij,njhw->nihw", m.to(x.dtype), x)


def _hue(x: Images, degrees: float) -> Images:
    """Rotate hue in YIQ space (a linear map: the chroma plane turns, luma stays)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    rot = torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    return _matrix(x, torch.linalg.inv(to_yiq) @ rot @ to_yiq).clamp(0, 1)


def _saturation(x: Images, saturation: float) -> Images:
    return torch.lerp(_grey(x), x, saturation).clamp(0, 1)


SEPIA = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])


def _sepia(x: Images, strength: float) -> Images:
    return torch.lerp(x, _matrix(x, SEPIA).clamp(0, 1), strength)


def _hue_colour(degrees: float) -> torch.Tensor:
    """A fully saturated RGB colour at ``degrees`` on the colour wheel (0 red, 120 green, 240 blue)."""
    k = torch.tensor([5.0, 3.0, 1.0])
    h = degrees / 60.0
    return 1 - torch.clamp(torch.minimum((k + h) % 6, 4 - (k + h) % 6), 0, 1)


def _tint(x: Images, tint_hue: float, tint_strength: float) -> Images:
    coloured = _grey(x) * _hue_colour(tint_hue).to(x.dtype).view(1, 3, 1, 1) * 1.5
    return torch.lerp(x, coloured.clamp(0, 1), tint_strength)


def _invert(x: Images, invert: float) -> Images:
    return torch.lerp(x, 1 - x, invert)


PERMUTATIONS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))  # every channel order but RGB


def _channels(x: Images, order: float) -> Images:
    return x[:, list(PERMUTATIONS[int(order) - 1])]


def _gamma(x: Images, gamma: float) -> Images:
    return x.clamp_min(1e-6).pow(gamma)


def _contrast(x: Images, contrast: float) -> Images:
    return ((x - 0.5) * contrast + 0.5).clamp(0, 1)


def _posterize(x: Images, levels: float) -> Images:
    n = int(levels) - 1
    return torch.round(x * n) / n


def _gaussian(x: Images, sigma: float) -> Images:
    """Separable Gaussian blur, reflect-padded, kernel radius ceil(2.5 sigma) (capped by the image)."""
    radius = max(1, min(math.ceil(2.5 * sigma), min(x.shape[-2:]) - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _blur(x: Images, radius: float) -> Images:
    return _gaussian(x, radius)


def _sharpen(x: Images, sharpness: float) -> Images:
    return (x + sharpness * (x - _gaussian(x, 1.0))).clamp(0, 1)


def _filter_grey(x: Images, kernel: list[list[float]]) -> Images:
    k = torch.tensor(kernel, dtype=x.dtype).view(1, 1, 3, 3)
    return F.conv2d(F.pad(_grey(x)[:, :1], (1, 1, 1, 1), mode="replicate"), k)


def _sketch(x: Images, edges: float) -> Images:
    """Pencil sketch: dark lines where the Sobel gradient of the grey image is strong."""
    gx = _filter_grey(x, [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gy = _filter_grey(x, [[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
    return (1 - edges * torch.sqrt(gx * gx + gy * gy + 1e-8)).clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def _emboss(x: Images, emboss: float) -> Images:
    relief = _filter_grey(x, [[-2, -1, 0], [-1, 0, 1], [0, 1, 2]])
    return (0.5 + emboss * relief / 4).clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def _pixelate(x: Images, block: float) -> Images:
    b = int(block)
    h, w = x.shape[-2:]
    small = F.adaptive_avg_pool2d(x, (max(1, h // b), max(1, w // b)))
    return F.interpolate(small, size=(h, w), mode="nearest")


def _fmt(v: float) -> str:
    return f"{v:g}"


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("hue", "colour", {"degrees": Param(20, 340)}, lambda p: f"hue rotation by {_fmt(p['degrees'])} degrees", _hue),
    Family("saturation", "colour", {"saturation": Param(0.0, 2.5)},
           lambda p: f"saturation x{_fmt(p['saturation'])}", _saturation),
    Family("sepia", "colour", {"strength": Param(0.2, 1.0)}, lambda p: f"sepia tone, strength {_fmt(p['strength'])}", _sepia),
    Family("tint", "colour", {"tint_hue": Param(0, 359), "tint_strength": Param(0.2, 1.0)},
           lambda p: f"colour tint at hue {_fmt(p['tint_hue'])}, strength {_fmt(p['tint_strength'])}", _tint),
    Family("invert", "colour", {"invert": Param(0.5, 1.0)}, lambda p: f"invert colours, amount {_fmt(p['invert'])}", _invert),
    Family("channels", "colour", {"order": Param(1, len(PERMUTATIONS), integer=True)},
           lambda p: f"swap colour channels to {''.join('RGB'[i] for i in PERMUTATIONS[int(p['order']) - 1])}", _channels),
    Family("gamma", "colour", {"gamma": Param(0.3, 3.0)}, lambda p: f"gamma {_fmt(p['gamma'])}", _gamma),
    Family("contrast", "colour", {"contrast": Param(0.3, 2.5)}, lambda p: f"contrast x{_fmt(p['contrast'])}", _contrast),
    Family("posterize", "colour", {"levels": Param(2, 8, integer=True)},
           lambda p: f"posterize to {int(p['levels'])} levels", _posterize),
    Family("blur", "spatial", {"radius": Param(0.5, 2.5)}, lambda p: f"gaussian blur, radius {_fmt(p['radius'])}", _blur),
    Family("sharpen", "spatial", {"sharpness": Param(0.5, 3.0)}, lambda p: f"sharpen, amount {_fmt(p['sharpness'])}", _sharpen),
    Family("sketch", "spatial", {"edges": Param(0.5, 4.0)}, lambda p: f"pencil sketch, edge strength {_fmt(p['edges'])}", _sketch),
    Family("emboss", "spatial", {"emboss": Param(0.5, 3.0)}, lambda p: f"emboss, strength {_fmt(p['emboss'])}", _emboss),
    Family("pixelate", "spatial", {"block": Param(2, 8, integer=True)},
           lambda p: f"pixelate, {int(p['block'])}-pixel blocks", _pixelate),
)}
