"""Retrieval for the residual generator: the k nearest training rows by condition, interpolated.

A query's condition key (the ``StructuredCondition`` features, or the standardised pooled text of a text
condition) is compared with every training row's key by Euclidean distance. The ``k`` nearest rows get
inverse-distance weights that sum to 1; an exact match (distance 0) takes all the weight, shared equally
when several rows match. Ties are broken by row order (a stable sort), so the neighbours are deterministic.

With ``residual_k`` > 0 the generator outputs ``retrieval(condition) + correction`` and learns only the
correction. Its training target for row ``i`` is ``row_i − retrieval`` computed *leave-one-out* (row ``i``
is not its own neighbour; otherwise every target would be 0). The index (rows, keys, k, residual scale)
lives in the model folder as ``retrieval.safetensors``: rows in the dataset's storage dtype, n × D values
(2 GB for 10,000 SD 1.5 rank-1 fp16 LoRAs), all loaded by ``WeightDiffusionModel.load``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from weightzoo.errors import InputError
from weightzoo.storage.tensors import load_tensors, save_tensors
from weightzoo.tasks.stats import safe_std

EXACT = 1e-9  # a distance at most this is an exact match (same condition)
CHUNK = 1024  # queries per distance matrix: CHUNK × n float64 at a time
FILE = "retrieval.safetensors"


def knn_weights(queries: torch.Tensor, keys: torch.Tensor, k: int,
                leave_one_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (q, k'), weights (q, k') float32) of each query's ``k`` nearest keys; ``k' = min(k, n − loo)``.

    ``leave_one_out``: query ``i`` is key ``i`` (queries are the keys) and never its own neighbour.
    """
    n = keys.shape[0] - int(leave_one_out)
    if k < 1 or n < 1:
        raise InputError(f"k-nearest retrieval needs k >= 1 and at least {1 + int(leave_one_out)} training rows")
    k = min(k, n)
    idx, weights = [], []
    for start in range(0, queries.shape[0], CHUNK):
        d = torch.cdist(queries[start:start + CHUNK].double(), keys.double())
        if leave_one_out:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = math.inf
        dist, near = torch.sort(d, dim=1, stable=True)
        dist, near = dist[:, :k], near[:, :k]
        exact = dist <= EXACT
        w = torch.where(exact.any(1, keepdim=True), exact.double(), 1.0 / dist.clamp_min(EXACT))
        idx.append(near)
        weights.append((w / w.sum(1, keepdim=True)).float())
    return torch.cat(idx), torch.cat(weights)


def interpolate(rows: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(q, D) float32: each query's weighted sum of ``rows[idx]``, a chunk of queries at a time."""
    out = torch.empty(idx.shape[0], rows.shape[1])
    for start in range(0, idx.shape[0], CHUNK // 8):
        part = slice(start, start + CHUNK // 8)
        out[part] = (rows[idx[part]].float() * weights[part, :, None]).sum(1)
    return out


def loo_residuals(z: torch.Tensor, keys: torch.Tensor, k: int,
                  keep_retrieval: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(residuals / scale, scale, retrievals): each row minus its leave-one-out retrieval, divided by the
    residuals' per-parameter std (a constant column gets 1), so the denoiser's targets are unit-scale.

    In place: ``z`` (n, D) becomes the scaled residuals, so the peak is two n × D copies, not three. The
    retrievals themselves (n × D) are returned only with ``keep_retrieval`` (objective 'task' scores whole
    rows), so the k-nearest search runs once either way.
    """
    near = interpolate(z, *knn_weights(keys, keys, k, leave_one_out=True))
    r = z.sub_(near)
    scale = safe_std(r.mean(0), r.std(0, unbiased=False), rtol=1e-6)
    return r.div_(scale), scale, near if keep_retrieval else None


@dataclass(frozen=True)
class RetrievalIndex:
    """The training rows (storage dtype, split order), their condition keys, ``k`` and the residual scale
    (per parameter, in standardised units) of a residual generator."""

    rows: torch.Tensor
    keys: torch.Tensor
    k: int
    scale: torch.Tensor

    def interpolate(self, queries: torch.Tensor) -> torch.Tensor:
        """(q, D) float32: the k-nearest interpolation of the rows for condition keys ``queries``."""
        return interpolate(self.rows, *knn_weights(queries.float(), self.keys, self.k))

    def save(self, uri: str) -> None:
        save_tensors(uri, {"rows": self.rows.contiguous(), "keys": self.keys.contiguous(),
                           "k": torch.tensor(self.k), "scale": self.scale})

    @classmethod
    def load(cls, uri: str) -> RetrievalIndex:
        t = load_tensors(uri)
        return cls(t["rows"], t["keys"], int(t["k"]), t["scale"])
