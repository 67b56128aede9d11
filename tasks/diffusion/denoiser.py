"""The weight denoiser: a small transformer over the blocks of one model, and its noise schedule.

Tokens are the ``n_blocks`` blocks of one (normalised) weight vector. Each token is the projected
block plus a learned block-index embedding (which block of the layout it is) plus the timestep
embedding; self-attention lets blocks of one model agree with each other, and cross-attention reads
the text-encoder states of the concept's condition. A second path adds the *pooled* condition (mean of
the valid text states, standardised over the training conditions) to every token: a random or weak
text encoder gives texts that differ in one word states that differ by a few percent, and
standardising makes that difference unit-scale. The output is the clean blocks ``x0``, as
``sqrt(ᾱ)·x_t + sqrt(1 − ᾱ)·F`` (the network learns only the correction to the best linear guess).
A residual generator's denoiser (``residual=True``) outputs ``F`` alone from a zero-initialised layer: its
x0 is a correction to a retrieval, which an untrained denoiser leaves exactly as it is, at any step count.

Schedule (Nichol & Dhariwal's cosine): continuous ``t`` in [0, 1], ``alpha_bar(t) = cos²((t + s) /
(1 + s) · π/2)`` with ``s = 0.008``, ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) ε``.
x0-prediction rather than ε: at ``t = 1`` the input is pure noise and the best x0 guess is the
conditional mean of the weights, which is exactly what an initialisation wants, so the paper's
one-step generation is simply ``steps=1``. Sampling is deterministic DDIM (η = 0) on an even grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from weightzoo.tasks.diffusion.config import DenoiserSize

COSINE_S = 0.008


class DenoiserConfig(DenoiserSize):
    """Shape of the denoiser: its size plus what the data fixes (saved in the model folder's ``config.json``)."""

    n_blocks: int = Field(ge=1, description="Blocks per model (set from the layout and block size).")
    block_size: int = Field(ge=1, description="Values per block.")
    text_dim: int = Field(ge=1, description="Width of the base text encoder's hidden states.")
    # A residual generator's denoiser predicts a correction to a retrieval (tasks/diffusion/retrieval.py).
    residual: bool = Field(False, description="Predict x0 = F alone (no skip), F's output layer zero-initialised: "
                           "untrained, it predicts exactly 0, so the generator starts as its retrieval baseline.")


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule ᾱ(t) for t in [0, 1] (ᾱ(0) ≈ 1, ᾱ(1) = 0)."""
    return torch.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2).pow(2).clamp(0.0, 1.0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000·t (the usual DDPM scale), (n,) → (n, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))


class _Layer(nn.Module):
    """Pre-norm self-attention over blocks, cross-attention to the text, then an MLP."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor) -> torch.Tensor:
        x = self.n1(h)
        h = h + self.self_attn(x, x, x, need_weights=False)[0]
        x = self.n2(h)
        h = h + self.cross_attn(x, text, text, key_padding_mask=text_pad, need_weights=False)[0]
        return h + self.mlp(self.n3(h))


class Denoiser(nn.Module):
    """Predict clean blocks x0 (n, B, S) from noisy blocks, timesteps (n,), text states (n, L, d) with their
    mask (n, L), and the standardised pooled text (n, d)."""

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        c = self.config = config
        self.inp = nn.Linear(c.block_size, c.width)
        self.block_index = nn.Embedding(c.n_blocks, c.width)
        self.time = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.text = nn.Linear(c.text_dim, c.width)
        self.pooled = nn.Sequential(nn.Linear(c.text_dim, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.layers = nn.ModuleList(_Layer(c.width, c.heads, c.dropout) for _ in range(c.depth))
        self.out_norm = nn.LayerNorm(c.width)
        self.out = nn.Linear(c.width, c.block_size)
        nn.init.normal_(self.block_index.weight, std=0.02)
        if c.residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(x_t.shape[1], device=x_t.device)
        temb = self.time(timestep_embedding(t, self.config.width))
        ctx = self.text(text)
        h = self.inp(x_t) + self.block_index(idx)[None] + (temb + self.pooled(pooled))[:, None]
        for layer in self.layers:
            h = layer(h, ctx, ~text_mask)
        if self.config.residual:  # no skip: x_t is noise around a correction, so 0 is the untrained answer
            return self.out(self.out_norm(h))
        # Preconditioning: for unit-variance data, sqrt(ᾱ)·x_t is the best linear guess of x0, so the
        # network only learns the correction, scaled by the noise level. Without this skip, every value
        # must squeeze through `width` features per block, and near t = 0 the network has to learn the identity.
        ab = alpha_bar(t).view(-1, 1, 1).to(h.dtype)
        return ab.sqrt() * x_t + (1 - ab).sqrt() * self.out(self.out_norm(h))


def noisy(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t for clean blocks ``x0`` (n, B, S) at times ``t`` (n,)."""
    ab = alpha_bar(t).view(-1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real values only (``mask`` (B, S) is False on the last block's padding)."""
    m = mask.to(pred.dtype)[None]
    return ((pred.float() - target.float()).pow(2) * m).sum() / (m.sum() * pred.shape[0])


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    pooled: torch.Tensor,
    steps: int = 10,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from pure noise at t = 1 to t = 0 in ``steps`` even steps; (n, B, S).

    ``steps=1`` is the paper's one-step generation: one x0 prediction from noise. The padding of the
    last block is zeroed, so ``BlockSpec.reassemble`` drops exactly nothing real.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    c = model.config
    device = next(model.parameters()).device
    n = text.shape[0]
    x = torch.randn(n, c.n_blocks, c.block_size, generator=generator).to(device)
    text, text_mask, pooled = text.to(device), text_mask.to(device), pooled.to(device)
    grid = torch.linspace(1.0, 0.0, steps + 1)
    x0 = x
    for i in range(steps):
        t, t_next = grid[i].item(), grid[i + 1].item()
        x0 = model(x, torch.full((n,), t, device=device), text, text_mask, pooled).float()
        ab, ab_next = alpha_bar(torch.tensor(t)), alpha_bar(torch.tensor(t_next))
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt().clamp_min(1e-8)
        x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
    return x0 if mask is None else x0 * mask.to(device)
