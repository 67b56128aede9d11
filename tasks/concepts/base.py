"""The image-to-image base: a small pix2pix/E2GAN-style conv encoder-decoder with skips, built offline.

``SkipUNetGenerator`` maps an image to its edited image: three resolutions down (stride-2 convs), back
up (nearest upsampling + conv) with the encoder's features concatenated at each scale, and a residual
output (``x + head(...)``) so that "change nothing" is easy. GroupNorm, never BatchNorm: a sample's
output must not depend on what else is in its batch, or packing concepts would change their weights.

``pretrain_base`` trains it on a broad mix of edits (every family, random parameters, compositions):
without a condition it learns the average edit, and with it general editing features (colour mixing,
gradients, local averages) that a per-concept LoRA then steers. ``save_base``/``load_base`` use
``config.json`` + ``model.safetensors`` at any fsspec URI; ``base_fingerprint`` hashes both.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from weightzoo.errors import NotFoundError
from weightzoo.storage.fs import filesystem, join, write_bytes
from weightzoo.storage.tensors import load_tensors, save_tensors
from weightzoo.tasks import stop
from weightzoo.tasks.concepts.sources import source_images
from weightzoo.tasks.concepts.zoo import random_spec
from weightzoo.tasks.seeds import stable_seed

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class SkipUNetConfig(BaseModel):
    """The base's shape (saved as config.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 16/32/64: ~110k parameters, ~25 MFLOP per 32x32 image, so a CPU trains hundreds of concepts.
    channels: tuple[int, int, int] = Field((16, 32, 64), description="Feature channels at full, 1/2 and 1/4 resolution.")
    # 32 px: the tiny-image setting of the bench; spatial edits (blur, pixelate) still read at this size.
    image_size: int = Field(32, ge=8, description="Native image size in pixels (square); a multiple of 4.")
    groups: int = Field(4, ge=1, description="GroupNorm groups (must divide every channel count).")


class SkipUNetGenerator(nn.Module):
    """A three-scale conv encoder-decoder with skip connections and a residual output (pix2pix-style)."""

    def __init__(self, config: SkipUNetConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        self.inc = nn.Conv2d(3, c1, 3, padding=1)
        self.down1 = nn.Conv2d(c1, c2, 4, stride=2, padding=1)
        self.down2 = nn.Conv2d(c2, c3, 4, stride=2, padding=1)
        self.mid = nn.Conv2d(c3, c3, 3, padding=1)
        self.up2 = nn.Conv2d(c3 + c2, c2, 3, padding=1)
        self.up1 = nn.Conv2d(c2 + c1, c1, 3, padding=1)
        self.outc = nn.Conv2d(c1 + 3, 3, 3, padding=1)
        self.norms = nn.ModuleList(nn.GroupNorm(config.groups, c) for c in (c1, c2, c3, c3, c2, c1))

    def _block(self, conv: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norms[i](conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self._block(self.inc, 0, x)
        h2 = self._block(self.down1, 1, h1)
        h3 = self._block(self.down2, 2, h2)
        h = self._block(self.mid, 3, h3)
        h = self._block(self.up2, 4, torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h2], 1))
        h = self._block(self.up1, 5, torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1))
        return x + self.outc(torch.cat([h, x], 1))


def build_base(config: SkipUNetConfig | None = None, seed: int = 0) -> SkipUNetGenerator:
    """A randomly initialised base (seeded)."""
    torch.manual_seed(stable_seed(seed, "skip-unet-init"))
    return SkipUNetGenerator(config or SkipUNetConfig())


def pretrain_base(model: SkipUNetGenerator, steps: int, *, batch: int = 32, lr: float = 2e-3, seed: int = 0,
                  pool: int = 512, progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place on random edits of a pool of source images (L1); returns the losses.

    Each image of each step gets its own random edit (family, parameters, sometimes a composition), so
    the base sees the whole space of edits rather than any one concept.
    """
    size = model.config.image_size
    sources = source_images(pool, size, stable_seed(seed, "pretrain-sources"))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    losses = []
    for step in range(steps):
        stop.check()  # an interrupted command ends here, within a step
        g = torch.Generator().manual_seed(stable_seed(seed, "pretrain-step", step))
        idx = torch.randint(0, pool, (batch,), generator=g)
        x = sources[idx]
        y = torch.cat([random_spec(g).apply(x[i : i + 1]) for i in range(batch)])
        loss = F.l1_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None and (step + 1) % 10 == 0:
            progress(step + 1, losses[-1])
    model.eval()
    return losses


def save_base(model: SkipUNetGenerator, uri: str, info: dict | None = None) -> str:
    """``config.json`` (shape + ``info``, e.g. how it was pretrained) and ``model.safetensors`` at ``uri``."""
    save_tensors(join(uri, WEIGHTS_NAME), {k: v.contiguous() for k, v in model.state_dict().items()})
    fs, path = filesystem(uri)
    card = {"class": type(model).__name__, "config": model.config.model_dump(mode="json"), "info": info or {}}
    write_bytes(fs, join(path, CONFIG_NAME), json.dumps(card, indent=1, sort_keys=True).encode())
    return uri


def load_base(uri: str, device: str | torch.device = "cpu") -> SkipUNetGenerator:
    """The base saved at ``uri`` (local path or any fsspec URL), in eval mode on ``device``."""
    fs, path = filesystem(uri)
    if not fs.exists(join(path, CONFIG_NAME)):
        raise NotFoundError(f"no edit base (config.json) at {uri}")
    card = json.loads(fs.cat_file(join(path, CONFIG_NAME)))
    model = SkipUNetGenerator(SkipUNetConfig(**card["config"]))
    model.load_state_dict(load_tensors(join(uri, WEIGHTS_NAME)))
    return model.to(device).eval()


def base_fingerprint(uri: str) -> str:
    """A short hash of the base's two files: rows record exactly which base they were trained on."""
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        h.update(name.encode() + b"\0" + fs.cat_file(join(path, name)))
    return h.hexdigest()[:16]


def make_base(uri: str, steps: int, config: SkipUNetConfig | None = None, seed: int = 0, **kw) -> str:
    """Build, pretrain ``steps`` steps and save a base at ``uri``; kept if one is already there."""
    fs, path = filesystem(uri)
    if fs.exists(join(path, CONFIG_NAME)):
        return uri
    model = build_base(config, seed)
    t0 = time.perf_counter()
    losses = pretrain_base(model, steps, seed=seed, **kw)
    info = {"pretrain_steps": steps, "seed": seed, "final_l1": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - t0, 1)}
    return save_base(model, uri, info)
