"""Canonical weight layout: which tensors, in which order, of which shape and dtype.

Every row of a dataset is one model's weights flattened with its layout. The order is a natural
sort of the module keys (``down_blocks.2`` before ``down_blocks.10``), never dict insertion order,
so the same LoRA always flattens to the same vector. The fingerprint names a layout in one string;
shards and ledger entries carry it, and readers refuse to mix layouts.

A layout may also name **fixed** tensors (``FixedTensor``): tensors every row shares that are not stored
in the row but rebuilt exactly from a rule, a seed and a scale (a LoRA whose A is frozen and shared:
rows hold only B). ``unflatten`` returns them with the stored ones, so every reader of a row (export,
merge, loading) sees the whole adapter; ``flatten`` stores only the row's own tensors. They enter the
JSON and the fingerprint only when there are some, so layouts without them are unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

# The suffixes of a LoRA row's keys (peft's names): one owner for every reader and writer of them.
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"

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


def _orthogonal_rows(shape: tuple[int, ...], seed: int, scale: float) -> torch.Tensor:
    """``shape[0]`` orthonormal rows of the flattened ``shape[1:]`` space, times ``scale``: the Q of a seeded
    float64 Gaussian (n, r) draw (signs fixed so R's diagonal is positive, which makes Q unique whatever
    LAPACK computed it), cast to float32 last."""
    r, n = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    if r > n:
        raise ValueError(f"orthogonal rule: {r} rows do not fit a space of {n} dimensions")
    g = torch.Generator().manual_seed(seed)
    q, rr = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    q = q * torch.where(rr.diagonal() < 0, -1.0, 1.0)
    return (q.T * scale).to(torch.float32).reshape(shape).contiguous()


RULES = {"orthogonal": _orthogonal_rows}  # how a fixed tensor is rebuilt, by the name a layout records


@dataclass(frozen=True)
class FixedTensor:
    """A tensor shared by every row and not stored in it: rebuilt as ``RULES[rule](shape, seed, scale)``."""

    key: str
    shape: tuple[int, ...]
    seed: int
    scale: float = 1.0
    rule: str = "orthogonal"
    # sha256 (16 hex) of the built float32 bytes: written with the layout, compared when it is read back, so a
    # rebuild that differs (torch's random stream changed) is refused instead of pairing rows with another A.
    check: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))  # hashable, and one JSON form
        object.__setattr__(self, "scale", float(self.scale))
        if self.rule not in RULES:
            raise ValueError(f"unknown fixed-tensor rule {self.rule!r}; known: {sorted(RULES)}")
        digest = hashlib.sha256(self.build().numpy().tobytes()).hexdigest()[:16]
        if self.check and self.check != digest:
            raise ValueError(f"fixed tensor {self.key} ({self.rule}, seed {self.seed}) rebuilds differently here "
                             f"(check {digest}, recorded {self.check}): the random stream it rests on changed "
                             "(another torch version?); its rows cannot be decoded with this A")
        object.__setattr__(self, "check", digest)

    def build(self) -> torch.Tensor:
        """The tensor (float32, CPU), a fresh copy, identical on every call; across machines and torch versions it
        relies on torch's seeded CPU ``randn`` stream, which ``check`` guards (see docs/FORMAT.md)."""
        return _built(self.rule, self.shape, self.seed, self.scale).clone()


@functools.lru_cache(maxsize=4096)
def _built(rule: str, shape: tuple[int, ...], seed: int, scale: float) -> torch.Tensor:
    return RULES[rule](shape, seed, scale)


@dataclass(frozen=True)
class Layout:
    """Ordered (key, shape) entries plus one storage dtype, and any fixed tensors rebuilt, not stored."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str = "float16"
    fixed: tuple[FixedTensor, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported layout dtype {self.dtype!r}; use one of {sorted(DTYPES)}")
        if len(self.keys) != len(self.shapes) or len(set(self.keys)) != len(self.keys):
            raise ValueError("layout keys must be unique and match shapes one to one")
        if list(self.keys) != sorted(self.keys, key=_natural_key):
            raise ValueError("layout keys must be in canonical (natural-sort) order; use Layout.from_state_dict")
        fixed = [f.key for f in self.fixed]
        if fixed != sorted(set(fixed), key=_natural_key) or set(fixed) & set(self.keys):
            raise ValueError("fixed tensors must have unique keys in canonical order, none of them a stored key")

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], dtype: str | None = None,
                        fixed: Iterable[FixedTensor] = ()) -> Layout:
        """The canonical layout of a state dict; ``dtype`` defaults to the tensors' own (which must agree);
        ``fixed``: tensors rows share and do not store (put in canonical order here)."""
        if not state_dict:
            raise ValueError("cannot build a layout from an empty state dict")
        keys = sorted(state_dict, key=_natural_key)
        if dtype is None:
            found = {dtype_name(t.dtype) for t in state_dict.values()}
            if len(found) != 1:
                raise ValueError(f"state dict mixes dtypes {sorted(found)}; pass dtype= to choose one")
            dtype = found.pop()
        fixed = tuple(sorted(fixed, key=lambda f: _natural_key(f.key)))
        return cls(tuple(keys), tuple(tuple(state_dict[k].shape) for k in keys), dtype, fixed)

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
        out = {"dtype": self.dtype, "entries": [[k, list(s)] for k, s in zip(self.keys, self.shapes, strict=True)]}
        if self.fixed:  # only when present: layouts without fixed tensors keep their JSON and fingerprint
            out["fixed"] = [asdict(f) | {"shape": list(f.shape)} for f in self.fixed]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Layout:
        d = json.loads(text)
        fixed = tuple(FixedTensor(**(f | {"shape": tuple(f["shape"])})) for f in d.get("fixed", ()))
        return cls(tuple(k for k, _ in d["entries"]), tuple(tuple(s) for _, s in d["entries"]), d["dtype"], fixed)

    @property
    def fingerprint(self) -> str:
        """``sha256`` of the canonical JSON, shortened: equal iff keys, shapes, dtype and fixed tensors are equal
        (a fixed tensor's ``check`` is derived from the rest, so it is left out)."""
        d = self.to_dict()
        for f in d.get("fixed", ()):
            f.pop("check")
        return hashlib.sha256(json.dumps(d, separators=(",", ":")).encode()).hexdigest()[:16]

    def fixed_tensors(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The fixed tensors by key (float32, the precision rows are trained against), on ``device``."""
        return {f.key: f.build().to(device) for f in self.fixed}

    def _check_fixed(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """A fixed tensor given with a row must be the layout's own: a row of this layout cannot carry another."""
        for f in self.fixed:
            if f.key in state_dict:
                t, want = state_dict[f.key].detach().to("cpu", torch.float32), f.build()
                if tuple(t.shape) != f.shape or not torch.allclose(t, want, rtol=1e-5, atol=1e-6 * float(f.scale)):
                    raise ValueError(f"{f.key} is not this layout's fixed tensor ({f.rule}, seed {f.seed}, scale {f.scale})")

    def flatten(self, state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One 1-D CPU tensor of ``self.dtype`` holding every stored entry in layout order (fixed tensors,
        if given, are checked and left out)."""
        missing = set(self.keys) - set(state_dict)
        extra = set(state_dict) - set(self.keys) - {f.key for f in self.fixed}
        if missing or extra:
            raise KeyError(f"state dict does not match layout {self.fingerprint}: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
        parts = []
        for k, shape in zip(self.keys, self.shapes, strict=True):
            t = state_dict[k]
            if tuple(t.shape) != shape:
                raise ValueError(f"{k}: shape {tuple(t.shape)} does not match layout shape {shape}")
            parts.append(t.detach().to("cpu", self.torch_dtype).reshape(-1))
        self._check_fixed(state_dict)
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """The state dict back from a flat vector (torch, or numpy as read from a shard): the stored entries as
        views, no copies, then the fixed tensors rebuilt (float32, on the vector's device)."""
        vec = self.as_tensor(vector)
        if vec.ndim != 1 or vec.numel() != self.numel:
            raise ValueError(f"vector has shape {tuple(vec.shape)}, layout {self.fingerprint} needs ({self.numel},)")
        offs = self.offsets
        stored = {k: vec[offs[i] : offs[i + 1]].view(shape) for i, (k, shape) in enumerate(zip(self.keys, self.shapes, strict=True))}
        return stored | self.fixed_tensors(vec.device)

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
