"""Where work runs: one rule for every stage, so 'auto' means the same thing everywhere."""

from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU; anything else ('cpu', 'cuda:1', ...) as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
