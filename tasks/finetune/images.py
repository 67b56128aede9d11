"""Image decoding: how an image file becomes the 8-bit RGB that is checked and trained on (``ImageConfig``).

``load_image`` is what manifest validation and training both read images with, so a validated image is
trained on exactly as it was checked. The rules are documented in docs/MANIFEST.md.
"""

from __future__ import annotations

import io
import os
import re
import stat
from typing import Annotated, Literal

import numpy as np
from fsspec import AbstractFileSystem
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem, is_local
from weightzoo.tasks.finetune.row import ManifestRow, image_uris

# The most ImageConfig.max_pixels may be (about 1.07 gigapixels); PIL's own bomb guard is kept above it.
PIXEL_CEILING = 1 << 30
# 16-bit grey as PIL opens it ("I" is how older Pillow opened 16-bit PNGs); PIL's convert() clips these at 255.
SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


Byte = Annotated[int, Field(ge=0, le=255)]


class ImageConfig(BaseModel):
    """How an image file becomes the 8-bit RGB that is checked and trained on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Composite by default: transparent cut-outs are common in subject folders, and flattening them on a known
    # colour is what a person expects; dropping alpha instead trains on whatever colour hid under it.
    alpha: Literal["composite", "refuse"] = Field(
        "composite",
        description="What to do with transparent pixels: 'composite' them on `background`, or 'refuse' the image "
        "(fully opaque images with an alpha channel are always accepted).",
    )
    # White: cut-outs are made to sit on white pages, and a plain light background is easy for a LoRA to ignore.
    background: tuple[Byte, Byte, Byte] = Field(
        (255, 255, 255), description="RGB colour (0-255 each) that transparent pixels are composited on."
    )
    # 50 MP: above the 48 MP of the largest phone photos, so no phone original is refused, yet a scan or a
    # crafted file (a decompression bomb) is stopped from its header before gigabytes of pixels are decoded;
    # validation decodes 16 images at once, and a 50 MP image is already 150 MB as RGB.
    max_pixels: int = Field(
        50_000_000, gt=0, le=PIXEL_CEILING,
        description=f"Largest width x height accepted; larger images are refused before decoding (at most {PIXEL_CEILING}).",
    )


DEFAULT_IMAGE_OPTIONS = ImageConfig()


class UnusableImageError(InputError):
    """An image that ``ImageConfig`` refuse: too many pixels, or transparent pixels under ``alpha='refuse'``."""


def _keep_pil_guard_behind_ours() -> None:
    """Raise PIL's decompression-bomb limit to PIXEL_CEILING (never lower it, nor turn a disabled one back on).

    PIL checks inside ``Image.open``, before the file's name is known to anyone: it warns above its limit
    (89 MP by default) and raises above twice that. With its limit at the largest ``max_pixels`` allowed, PIL
    says nothing about an image we accept, and its error (above 2 GP) is turned into ours in ``_open``.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < PIXEL_CEILING:
        Image.MAX_IMAGE_PIXELS = PIXEL_CEILING


_keep_pil_guard_behind_ours()


def _too_large(uri: str, size: str, limit: int) -> UnusableImageError:
    return UnusableImageError(f"image too large: {uri} is {size} pixels, over the limit of {limit:,} (max_pixels)")


def _open(data: bytes, uri: str, limit: int) -> Image.Image:
    """Open (header only) an image, reporting PIL's bomb error as ours so it names the file.

    PIL's warning (above PIXEL_CEILING, so only for images refused anyway) is caught too, for processes
    that turn warnings into errors.
    """
    try:
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(uri, f"{int(found[1]):,}" if found else "over 2x PIL's limit of", limit) from None


def _check_size(im: Image.Image, uri: str, limit: int) -> None:
    """Refuse an image of more than ``limit`` pixels from its header, before its pixels are decoded."""
    width, height = im.size
    if width * height > limit:
        raise _too_large(uri, f"{width}x{height} = {width * height:,}", limit)


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit grey scaled to 8-bit 'L' (or 'LA' if it has a tRNS key); any other image as it is.

    PIL's convert() clips 16-bit values at 255, so a 16-bit PNG came out nearly white. PIL already
    reduces 16-bit RGB, RGBA and grey+alpha PNGs to 8 bits as it decodes them.
    """
    if im.mode not in SIXTEEN_BIT_GREY:
        return im
    values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
    grey = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    key = im.info.get("transparency")
    if not isinstance(key, int):
        return grey
    alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
    return Image.merge("LA", [grey, alpha])


def _flatten(im: Image.Image, uri: str, options: ImageConfig) -> Image.Image:
    """``im`` as RGB; transparent pixels composited on ``options.background``, or refused, never silently dropped."""
    if not im.has_transparency_data:
        return im.convert("RGB")
    rgba = np.asarray(im.convert("RGBA")).astype(np.uint16)  # 255 * 255 + 127 still fits in 16 bits
    colour, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() < 255 and options.alpha == "refuse":
        raise UnusableImageError(f"image has transparent pixels: {uri} (the alpha policy is 'refuse')")
    background = np.array(options.background, dtype=np.uint16)
    return Image.fromarray(((colour * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8))


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def check_regular_file(fs: AbstractFileSystem, path: str, uri: str) -> None:
    """Refuse a local path that is not a regular file, from its ``stat`` alone: opening a FIFO blocks until
    someone writes to it (validation hung, deaf to SIGTERM), and a device reads forever. Symlinks are
    followed, as the read would; an object store holds only objects, so nothing is asked of it here."""
    if not is_local(fs):
        return
    mode = os.stat(path).st_mode  # FileNotFoundError: the caller's "image not found"
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise UnusableImageError(f"image is not a regular file: {uri} is {kind}")


def load_image(uri: str, options: ImageConfig = DEFAULT_IMAGE_OPTIONS) -> Image.Image:
    """Read and fully decode one image as the 8-bit RGB that is trained on (see ``ImageConfig``).

    Turned upright by its EXIF orientation, 16-bit grey scaled to 8 bits, transparency composited or refused,
    oversize refused before decoding, a local path that is not a regular file (a FIFO, a device) refused
    before it is opened. Raises FileNotFoundError, UnusableImageError, or PIL's error for a
    file that does not decode.
    """
    fs, path = filesystem(uri)
    check_regular_file(fs, path, uri)
    with _open(fs.cat_file(path), uri, options.max_pixels) as im:
        _check_size(im, uri, options.max_pixels)
        im.load()
        upright = ImageOps.exif_transpose(im)  # a copy, so it outlives the file
    return _flatten(_to_8bit(upright), uri, options)


def load_images(
    row: ManifestRow, base_uri: str | None = None, image_options: ImageConfig = DEFAULT_IMAGE_OPTIONS
) -> list[Image.Image]:
    """Every image of a row, read as training reads them; raises on the first that cannot be used."""
    uris = image_uris(row, base_uri)
    if not uris:
        raise InputError(f"row {row.id!r} has no images")
    return [load_image(u, image_options) for u in uris]
