"""The manifest: one typed row per identity or concept to fine-tune.

Image references are URIs (any fsspec URL) or paths relative to the manifest's own folder.
"""

from __future__ import annotations

import io
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from weightzoo.storage.fs import filesystem, join

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ManifestRow(BaseModel):
    """One fine-tune to run: who or what, with which prompt, from which images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(description="Unique id; becomes part of file names, so letters, digits, '.', '_', '-' only.")
    kind: Literal["identity", "concept"] = Field("identity", description="A person-like identity or a concept.")
    prompt: str = Field("sks person", description="Instance prompt with the rare token, e.g. 'sks person'.")
    class_prompt: str = Field("person", description="Class prompt for prior preservation, e.g. 'person'.")
    images: list[str] = Field(default_factory=list, description="Image URIs, absolute or relative to the manifest.")
    image_dir: str | None = Field(None, description="A folder URI whose images are all used (instead of, or as well as, images).")
    attributes: dict[str, str] = Field(default_factory=dict, description="Labels (e.g. colour=red) for edit directions.")


def resolve(uri: str, base_uri: str | None) -> str:
    """``uri`` as an absolute URI: relative paths are taken against the manifest's folder ``base_uri``."""
    if "://" in uri or uri.startswith("/") or base_uri is None:
        return uri
    return join(base_uri, uri)


def image_uris(row: ManifestRow, base_uri: str | None = None) -> list[str]:
    """Every image URI of a row: its listed images, then the images in its folder (sorted)."""
    uris = [resolve(u, base_uri) for u in row.images]
    if row.image_dir:
        folder = resolve(row.image_dir, base_uri)
        fs, path = filesystem(folder)
        protocol = folder.split("://", 1)[0] + "://" if "://" in folder else ""
        uris += [protocol + p for p in sorted(fs.find(path)) if p.lower().endswith(IMAGE_SUFFIXES)]
    return uris


def load_image(uri: str) -> Image.Image:
    """Read and fully decode one image as RGB (raises on missing or undecodable files)."""
    fs, path = filesystem(uri)
    with Image.open(io.BytesIO(fs.cat_file(path))) as im:
        im.load()
        return im.convert("RGB")


def load_images(row: ManifestRow, base_uri: str | None = None) -> list[Image.Image]:
    uris = image_uris(row, base_uri)
    if not uris:
        raise ValueError(f"row {row.id!r} has no images")
    return [load_image(u) for u in uris]
