"""The block dataset of weight diffusion: normalised weight vectors cut into equal blocks, with their condition.

As in Gong et al. (ECCV 2024), a model's flat weight vector is cut into ``n_blocks`` blocks of
``block_size`` values; block ``i`` is always the same slice of the layout, so its index says which
parameters it holds. The last block is zero-padded and ``BlockSpec.mask`` marks the padding, which
the loss ignores. Before cutting, every parameter is standardised, ``z = (x - mean) / std``, so the
denoiser sees unit-scale values whatever the layer (LoRA ``A`` and ``B`` differ by orders of magnitude).

The condition of a row is text embedded by the base model's own text encoder (no extra model): the
row's prompt, or with ``condition="prompt+attributes"`` the prompt followed by the row's attributes
(``"sks person, accessory hat, colour red, ..."``), which distinguishes subjects that share one prompt.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from weightzoo.errors import InputError, NotFoundError
from weightzoo.storage.dataset import Dataset
from weightzoo.storage.layout import Layout
from weightzoo.storage.tensors import load_tensors
from weightzoo.tasks.diffusion.config import Condition
from weightzoo.tasks.stats import safe_std


@dataclass(frozen=True)
class BlockSpec:
    """How a vector of ``numel`` values is cut into blocks of ``block_size`` (the last one zero-padded)."""

    numel: int
    block_size: int

    def __post_init__(self) -> None:
        if self.numel < 1 or self.block_size < 1:
            raise ValueError(f"numel and block_size must be positive, got {self.numel}, {self.block_size}")

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.numel / self.block_size)

    @property
    def padded(self) -> int:
        return self.n_blocks * self.block_size

    def mask(self) -> torch.Tensor:
        """(n_blocks, block_size) bool: True where a value is real, False in the last block's padding."""
        return (torch.arange(self.padded) < self.numel).view(self.n_blocks, self.block_size)

    def cut(self, vectors: torch.Tensor) -> torch.Tensor:
        """(n, numel) → (n, n_blocks, block_size), zero padding at the end (a copy, in the input's dtype)."""
        if vectors.ndim != 2 or vectors.shape[1] != self.numel:
            raise ValueError(f"expected (n, {self.numel}) vectors, got {tuple(vectors.shape)}")
        out = vectors.new_zeros(vectors.shape[0], self.padded)
        out[:, : self.numel] = vectors
        return out.view(-1, self.n_blocks, self.block_size)

    def reassemble(self, blocks: torch.Tensor) -> torch.Tensor:
        """(n, n_blocks, block_size) → (n, numel): the inverse of ``cut`` (padding dropped)."""
        if blocks.shape[1:] != (self.n_blocks, self.block_size):
            raise ValueError(f"expected (n, {self.n_blocks}, {self.block_size}) blocks, got {tuple(blocks.shape)}")
        return blocks.reshape(blocks.shape[0], self.padded)[:, : self.numel]


@dataclass(frozen=True)
class Stats:
    """Per-parameter mean and std (float32, (D,)); a constant parameter has std 1, as in ``tasks/subspace/pca.py``."""

    mean: torch.Tensor
    std: torch.Tensor

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.std + self.mean


def _as_float(layout: Layout, w: np.ndarray) -> torch.Tensor:
    return layout.as_tensor(w).float()


# How rows are re-expressed before anything is learnt from them (the SVD form, tasks/finetune/gauge.py).
RowForm = Callable[[torch.Tensor], torch.Tensor]


def _as_rows(layout: Layout, w: np.ndarray, form: RowForm | None) -> torch.Tensor:
    x = _as_float(layout, w)
    return x if form is None else form(x)


def compute_stats(dataset: Dataset, ids: Iterable[str] | None = None, form: RowForm | None = None) -> Stats:
    """Mean and std (ddof 0) of the rows ``ids`` (default all), in one streaming float64 pass.

    Computed on the training rows only, so held-out rows leak nothing into the normalisation.
    """
    keep = None if ids is None else set(ids)
    n, s, ss = 0, None, None
    for table, w in dataset.iter_batches(["id"]):
        x = _as_rows(dataset.layout, w, form).double()
        if keep is not None:
            x = x[torch.tensor([i in keep for i in table.column("id").to_pylist()])]
        if s is None:
            s, ss = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
        n += x.shape[0]
        s += x.sum(0)
        ss += (x * x).sum(0)
    if not n:
        raise NotFoundError(f"no rows to compute statistics from in {dataset.uri}")
    mean = s / n
    std = safe_std(mean, (ss / n - mean * mean).clamp_min(0).sqrt())
    return Stats(mean.float(), std.float())


def load_stats(uri: str, numel: int) -> Stats:
    """``mean`` and ``std`` from a safetensors file such as ``tasks/subspace/pca.py``'s ``subspace.safetensors``."""
    tensors = load_tensors(uri)
    if "mean" not in tensors or "std" not in tensors:
        raise InputError(f"{uri} has no 'mean' and 'std' tensors")
    stats = Stats(tensors["mean"].float().reshape(-1), tensors["std"].float().reshape(-1))
    if stats.mean.numel() != numel or stats.std.numel() != numel:
        raise InputError(f"statistics in {uri} have {stats.mean.numel()} values, the layout has {numel}")
    return stats


def condition_text(prompt: str, attributes: Mapping[str, str] | None, condition: Condition) -> str:
    """The text a row is conditioned on. Attributes are sorted by name, so the text is canonical."""
    if condition == "prompt":
        return prompt
    if condition == "prompt+attributes":
        parts = [f"{k} {v}" for k, v in sorted((attributes or {}).items())]
        return ", ".join([prompt, *parts]) if parts else prompt
    raise InputError(f"unknown condition {condition!r}; use 'prompt' or 'prompt+attributes'")


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-sequence text-encoder states (n, L, d) and the token mask (n, L) bool, one call per text.

    The full sequence (what the UNet cross-attends to) rather than the pooled vector: the denoiser's
    cross-attention can pick out the words that differ between subjects. Padding is masked, so a
    text's embedding does not depend on what else is in the batch.
    """
    states, masks = [], []
    device = next(text_encoder.parameters()).device
    for text in texts:
        tok = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        states.append(text_encoder(tok.input_ids.to(device))[0].float().cpu()[0])
        masks.append(tok.attention_mask[0].bool())
    return torch.stack(states), torch.stack(masks)


def pool_text(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each text's valid token states, (n, L, d) → (n, d)."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


def text_stats(pooled: torch.Tensor) -> Stats:
    """Per-dimension mean/std of the pooled training conditions (std 1 where all conditions agree)."""
    mean = pooled.mean(0)
    # float32 text states: a looser tolerance than float64 weight moments, for the same rule
    return Stats(mean, safe_std(mean, pooled.std(0, unbiased=False), rtol=1e-6))


@dataclass
class BlockData:
    """The training set in memory: normalised vectors and the condition text of each row."""

    ids: list[str]
    texts: list[str]
    z: torch.Tensor  # (n, D) float32, normalised
    raw: torch.Tensor | None = None  # (n, D) as stored (the layout's dtype), when asked for


def load_rows(dataset: Dataset, ids: Sequence[str], stats: Stats, condition: Condition, raw: bool = False,
              form: RowForm | None = None) -> BlockData:
    """Read rows ``ids`` (in that order) normalised, with their condition text; one streaming pass.

    Holds n × D float32 in memory (4 GB for 10,000 SD 1.5 rank-1 LoRAs); the denoiser samples batches
    from it at random, which a sequential stream over shards could not do. ``raw`` also keeps the rows as
    stored (a residual generator's retrieval index), n × D more values in the layout's dtype. ``form``
    re-expresses every row first (then "as stored" means: in that form, in the layout's dtype).
    """
    want = {i: k for k, i in enumerate(ids)}
    z = torch.empty(len(ids), dataset.layout.numel)
    kept = torch.empty(len(ids), dataset.layout.numel, dtype=dataset.layout.torch_dtype) if raw else None
    texts = [""] * len(ids)
    found = 0
    for table, w in dataset.iter_batches(["id", "prompt", "attributes"]):
        stored = dataset.layout.as_tensor(w)
        x = stored.float() if form is None else form(stored.float())
        stored = stored if form is None else x.to(stored.dtype)
        for j, (rid, prompt, attrs) in enumerate(zip(*(table.column(c).to_pylist() for c in ("id", "prompt", "attributes")),
                                                     strict=True)):
            if rid in want:
                k = want[rid]
                z[k] = stats.normalise(x[j])
                if kept is not None:
                    kept[k] = stored[j]
                texts[k] = condition_text(prompt or "", dict(attrs or []), condition)
                found += 1
    if found != len(ids):
        raise NotFoundError(f"{len(ids) - found} of the requested ids are not committed in {dataset.uri}")
    return BlockData(list(ids), texts, z, kept)


def split_ids(ids: Sequence[str], holdout_ids: Iterable[str] = (), holdout_fraction: float = 0.0,
              seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, holdout): the named ids plus a seeded random ``holdout_fraction`` of the rest are held out.

    Deterministic in (sorted ids, seed), so the same dataset and options always give the same split.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise InputError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    ids = sorted(ids)
    named = set(holdout_ids)
    unknown = named - set(ids)
    if unknown:
        raise NotFoundError(f"holdout ids not in the dataset: {sorted(unknown)[:5]}")
    rest = [i for i in ids if i not in named]
    extra = random.Random(f"weightzoo-holdout:{seed}").sample(rest, round(holdout_fraction * len(ids)))
    holdout = named | set(extra)
    train = [i for i in ids if i not in holdout]
    if not train:
        raise InputError("the holdout leaves no rows to train on")
    return train, sorted(holdout)


def dump_json(obj: object) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()
