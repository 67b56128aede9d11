"""Canonical weight layout: which tensors, in which order, of which shape and dtype.

Every row of a dataset is one model's weights flattened with its layout. The order is a natural
sort of the module keys (``down_blocks.2`` before ``down_blocks.10``), never dict insertion order,
so the same LoRA always flattens to the same vector. The fingerprint names a layout in one string;
shards and ledger entries carry it, and readers refuse to mix layouts.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# numpy has no bfloat16: bf16 bytes are viewed as int16 (same width), then as bf16 in torch.
NUMPY_VIEW: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<i2"),
    "float32": np.dtype("<f4"),
}

if sys.byteorder != "little":  # the on-disk format is little-endian; flatten() relies on native order
    raise ImportError("weightzoo's weight layout requires a little-endian machine")


def _natural_key(key: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported weight dtype {dtype}; use one of {sorted(DTYPES)}")


@dataclass(frozen=True)
class Layout:
    """Ordered (key, shape) entries plus one storage dtype."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported layout dtype {self.dtype!r}; use one of {sorted(DTYPES)}")
        if len(self.keys) != len(self.shapes) or len(set(self.keys)) != len(self.keys):
            raise ValueError("layout keys must be unique and match shapes one to one")
        if list(self.keys) != sorted(self.keys, key=_natural_key):
            raise ValueError("layout keys must be in canonical (natural-sort) order; use Layout.from_state_dict")

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], dtype: str | None = None) -> Layout:
        """The canonical layout of a state dict; ``dtype`` defaults to the tensors' own (which must agree)."""
        if not state_dict:
            raise ValueError("cannot build a layout from an empty state dict")
        keys = sorted(state_dict, key=_natural_key)
        if dtype is None:
            found = {dtype_name(t.dtype) for t in state_dict.values()}
            if len(found) != 1:
                raise ValueError(f"state dict mixes dtypes {sorted(found)}; pass dtype= to choose one")
            dtype = found.pop()
        return cls(tuple(keys), tuple(tuple(state_dict[k].shape) for k in keys), dtype)

    @property
    def numel(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def itemsize(self) -> int:
        return NUMPY_VIEW[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def offsets(self) -> list[int]:
        """Start offset of each entry in the flat vector (plus the total at the end)."""
        out = [0]
        for s in self.shapes:
            out.append(out[-1] + int(np.prod(s, dtype=np.int64)))
        return out

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "entries": [[k, list(s)] for k, s in zip(self.keys, self.shapes, strict=True)]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Layout:
        d = json.loads(text)
        return cls(tuple(k for k, _ in d["entries"]), tuple(tuple(s) for _, s in d["entries"]), d["dtype"])

    @property
    def fingerprint(self) -> str:
        """``sha256`` of the canonical JSON, shortened: equal iff keys, shapes and dtype are equal."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def flatten(self, state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One 1-D CPU tensor of ``self.dtype`` holding every entry in layout order."""
        missing = set(self.keys) - set(state_dict)
        extra = set(state_dict) - set(self.keys)
        if missing or extra:
            raise KeyError(f"state dict does not match layout {self.fingerprint}: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
        parts = []
        for k, shape in zip(self.keys, self.shapes, strict=True):
            t = state_dict[k]
            if tuple(t.shape) != shape:
                raise ValueError(f"{k}: shape {tuple(t.shape)} does not match layout shape {shape}")
            parts.append(t.detach().to("cpu", self.torch_dtype).reshape(-1))
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """The state dict back from a flat vector (torch, or numpy as read from a shard); views, no copies."""
        vec = self.as_tensor(vector)
        if vec.ndim != 1 or vec.numel() != self.numel:
            raise ValueError(f"vector has shape {tuple(vec.shape)}, layout {self.fingerprint} needs ({self.numel},)")
        offs = self.offsets
        return {k: vec[offs[i] : offs[i + 1]].view(shape) for i, (k, shape) in enumerate(zip(self.keys, self.shapes, strict=True))}

    def as_tensor(self, array: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A torch view of ``array`` in this layout's dtype (numpy bf16 rows arrive as int16)."""
        if isinstance(array, torch.Tensor):
            return array if array.dtype == self.torch_dtype else array.to(self.torch_dtype)
        t = torch.from_numpy(array)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t.to(self.torch_dtype)

    def to_numpy(self, vectors: torch.Tensor) -> np.ndarray:
        """Rows (n, D) or one row (D,) as a numpy array of this layout's storage view (bf16 → int16)."""
        t = vectors.detach().to("cpu", self.torch_dtype).contiguous()
        return (t.view(torch.int16) if self.dtype == "bfloat16" else t).numpy()
