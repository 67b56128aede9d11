"""Per-column standardisation statistics, one rule for every stage (subspace, weight diffusion, conditions).

weights2weights standardises each parameter, ``z = (x − mean) / std``. A column whose std is negligible
next to its mean (a constant parameter, or a frozen factor) would blow up; it gets std 1 instead, so it
contributes nothing after centring.
"""

from __future__ import annotations

import torch


def constant_columns(mean: torch.Tensor, std: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """Columns whose std is at most ``rtol`` times their mean's magnitude (or ``rtol`` near zero)."""
    return std <= rtol * mean.abs().clamp_min(1.0)


def safe_std(mean: torch.Tensor, std: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """``std`` with constant columns set to 1 (see ``constant_columns``)."""
    return torch.where(constant_columns(mean, std, rtol), torch.ones_like(std), std)
