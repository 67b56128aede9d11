"""Tensors at any URI as safetensors files: never pickled, written atomically through the fs entry point."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from weightzoo.storage.fs import filesystem, write_bytes


def save_tensors(uri: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors as one safetensors file at any fsspec URI (atomically); returns the URI."""
    fs, path = filesystem(uri)
    data = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_bytes(fs, path, data)
    return uri


def load_tensors(uri: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``uri`` (on CPU)."""
    fs, path = filesystem(uri)
    return st_load(fs.cat_file(path))
