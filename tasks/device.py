"""Where work runs and in which precision: one rule for every stage, so 'auto' means the same everywhere."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU; anything else ('cpu', 'cuda:1', ...) as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_bf16(mixed_precision: str, device: torch.device) -> bool:
    """'bf16' always, 'auto' on CUDA only (CPUs run fp32 faster than emulated bf16), 'no' never."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def autocast(mixed_precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``use_bf16`` says so (weights stay fp32), else a no-op context."""
    if use_bf16(mixed_precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
