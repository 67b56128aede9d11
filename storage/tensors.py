"""Tensors at any URI as safetensors files: never pickled, written atomically through the fs entry point."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from weightzoo.storage.fs import atomic_write, filesystem, is_local, write_bytes


def save_tensors(
    uri: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None, durable: bool = True
) -> str:
    """Write tensors as one safetensors file at any fsspec URI (atomically; fsynced unless not
    ``durable``); returns the URI."""
    fs, path = filesystem(uri)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if is_local(fs):  # straight to the file: no bytes object of the whole file (docs/BENCHMARKS.md, "Figures behind defaults")
        with atomic_write(fs, path, durable) as f:
            save_file(cpu, f.name, metadata=metadata)  # the temporary's own path; f only fsyncs and renames it
        return uri
    write_bytes(fs, path, st_save(cpu, metadata=metadata), durable)
    return uri


def load_tensors(uri: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``uri`` (on CPU; local files are memory-mapped
    copy-on-write, so they are read on first use and in-place ops never reach the file)."""
    fs, path = filesystem(uri)
    return load_file(path) if is_local(fs) else st_load(fs.cat_file(path))
