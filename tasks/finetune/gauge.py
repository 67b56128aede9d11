"""The gauge of a LoRA row, and its SVD form.

A rank-r adapter stores ``(B, A)`` but acts only through ``ΔW = B·A`` (the scale α/r is the same for every
row of a dataset). Any invertible r×r ``M`` gives the same ΔW as ``(B·M, M⁻¹·A)``: rows of nearly the same
edit can sit far apart, and an average of rows is not a row of the average edit. The **SVD form** removes
that freedom: ΔW's rank-r SVD ``U·S·Vᵀ`` stored back as ``B = U·√S``, ``A = √S·Vᵀ``, each component's sign
fixed (the largest-magnitude entry of its ``U`` column positive). Same layout, same ΔW, only the factors
change, so a row in this form is still a row: it exports, loads and trains as any other.

The SVD form is the *slowest* gauge to fine-tune from: Adam moves every factor entry by about its learning
rate, so ΔW moves by about ``lr·(|A| + |B|)`` per step, least when ``|B|`` and ``|A|`` are equal. Rows trained
from peft's init keep A near its Kaiming norm and B small (the concept zoo's: |A| ≈ 2.5, |B| ≈ 0.6 per
component). ``a_norms`` measures that split on stored rows, and ``svd_form(..., norms)`` puts a row in
**the recipe's gauge**: the same ΔW with ``A = c·Vᵀ`` (orthogonal rows of the stored rows' median norm c) and
``B = U·S/c``, factored as a trained row is. Measured (docs/BENCHMARKS.md, "The recipe's gauge"): on three
draws of held-out edit concepts, starts put in it reach the target neither faster nor slower than as they
are, so nothing applies it by default; ``bench/concept_zoo.py --gauge-scale`` scores it.

``mean_edit`` is the average *edit* of rows (the weighted mean of their ΔW, truncated to rank r by SVD),
where averaging the stored factors gives ``mean(B)·mean(A)``, which is no row's edit.

The SVD runs on the factors, never on ΔW itself: ``B = Q_b R_b``, ``Aᵀ = Q_a R_a`` (thin QR), then the SVD
of the small ``R_b R_aᵀ``. That is O((out + in)·R²) per layer instead of O(out·in·min(out, in)), so an SD
1.5 row's 1280×1280 layers cost no more than its small ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightzoo.errors import InputError
from weightzoo.storage.layout import LORA_A, LORA_B, Layout


@dataclass(frozen=True)
class FactorPair:
    """Where one adapted module's A ``(r, in…)`` and B ``(out, r, …)`` sit in a row."""

    a: slice
    b: slice
    rank: int
    out: int


def factor_pairs(layout: Layout) -> list[FactorPair]:
    """Every module whose A and B are both stored in the row; refused when there is none (a fixed, shared
    A has no gauge to remove, and a row of full weights has no factors)."""
    offs, index = layout.offsets, {k: i for i, k in enumerate(layout.keys)}
    pairs = []
    for key, i in index.items():
        j = index.get(key[: -len(LORA_A)] + LORA_B) if key.endswith(LORA_A) else None
        if j is not None:
            rank, out = layout.shapes[i][0], layout.shapes[j][0]
            pairs.append(FactorPair(slice(offs[i], offs[i + 1]), slice(offs[j], offs[j + 1]), rank, out))
    if not pairs:
        raise InputError("the SVD form needs LoRA rows that store both lora_A and lora_B (this layout stores "
                         "no such pair: a frozen shared A, or full weights, has no gauge to remove)")
    return pairs


def balanced(b: torch.Tensor, a: torch.Tensor, rank: int, a_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` with ``B'·A'`` the best rank-``rank`` approximation of ``b·a`` in the SVD form, or with
    ``a_norm``, in the gauge whose A rows are orthogonal of that norm (``B' = U·S/a_norm``).

    ``b`` (n, out, R), ``a`` (n, R, m), any R (R > rank: a sum of adapters, truncated). Float64 inside.
    """
    n, out, m = b.shape[0], b.shape[1], a.shape[2]
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().transpose(1, 2))
    u, s, vh = torch.linalg.svd(rb @ ra.transpose(1, 2))
    k = min(rank, s.shape[-1])
    u, v, s = qb @ u[..., :k], qa @ vh.transpose(1, 2)[..., :k], s[..., :k]
    pick = u.abs().argmax(1, keepdim=True)
    sign = torch.where(torch.gather(u, 1, pick) < 0, -1.0, 1.0).to(u.dtype)  # (n, 1, k): flips U and V alike
    on_b, on_a = (s.sqrt(), s.sqrt()) if a_norm is None else (s / a_norm, torch.full_like(s, a_norm))
    big_b, big_a = u.new_zeros(n, out, rank), u.new_zeros(n, rank, m)
    big_b[..., :k] = u * sign * on_b[:, None, :]
    big_a[:, :k] = (v * sign * on_a[:, None, :]).transpose(1, 2)
    return big_b.to(b.dtype), big_a.to(a.dtype)


def _factors(rows: torch.Tensor, p: FactorPair) -> tuple[torch.Tensor, torch.Tensor]:
    n = rows.shape[0]
    return rows[:, p.b].reshape(n, p.out, p.rank), rows[:, p.a].reshape(n, p.rank, -1)


def a_norms(layout: Layout, rows: torch.Tensor) -> list[float]:
    """Per factor pair (``factor_pairs`` order): the median norm of the rows' A rows, the recipe's gauge."""
    return [float(_factors(rows.float(), p)[1].norm(dim=2).median()) for p in factor_pairs(layout)]


def svd_form(layout: Layout, rows: torch.Tensor, norms: list[float] | None = None) -> torch.Tensor:
    """(n, D) float32 rows in the SVD form (or, with ``norms`` from ``a_norms``, in that recipe's gauge): every
    module's ΔW unchanged (to float rounding), factors canonical."""
    out = rows.float().clone()
    for i, p in enumerate(factor_pairs(layout)):
        b, a = _factors(out, p)
        nb, na = balanced(b, a, p.rank, None if norms is None else norms[i])
        out[:, p.b], out[:, p.a] = nb.reshape(len(out), -1), na.reshape(len(out), -1)
    return out


def mean_edit(layout: Layout, rows: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
              norms: list[float] | None = None) -> torch.Tensor:
    """(q, D) float32: for each query, the weighted mean of the edits of ``rows[idx[q]]`` (weights summing
    to 1), truncated to the rows' rank, in the SVD form (or the gauge of ``norms``, as ``svd_form``); any value
    outside the factors is averaged as is."""
    near = rows[idx].float()  # (q, k, D)
    w = weights.float()[..., None]
    out = (near * w).sum(1)
    q, k = idx.shape
    for i, p in enumerate(factor_pairs(layout)):
        b, a = _factors(near.reshape(q * k, -1), p)
        b = (b.view(q, k, p.out, p.rank) * w[..., None]).permute(0, 2, 1, 3).reshape(q, p.out, k * p.rank)
        a = a.reshape(q, k * p.rank, -1)
        nb, na = balanced(b, a, p.rank, None if norms is None else norms[i])
        out[:, p.b], out[:, p.a] = nb.reshape(q, -1), na.reshape(q, -1)
    return out
