"""Each model family's training objective: its text conditioning, its timestep draw and its per-sample loss.

Taken from diffusers' DreamBooth-LoRA script of each family (docs/BASES.md):
- **sd, sdxl** (``train_dreambooth_lora.py``, ``train_dreambooth_lora_sdxl.py``): DDPM, timesteps uniform
  over the training schedule, the target is the noise (or the velocity for v-prediction bases). SDXL adds
  the pooled embedding of its second text encoder and the time ids (original size, crop, target size).
- **sd3** (``train_dreambooth_lora_sd3.py``): rectified flow, ``x_σ = (1-σ)x + σε``, σ drawn by the
  script's default ``logit_normal`` density (mean 0, std 1; its loss weighting is then 1), outputs
  preconditioned to predict x (``precondition_outputs=1``): loss ``|(-σ)·v + x_σ - x|²``.
- **flux** (``train_dreambooth_lora_flux.py``): rectified flow with the script's default ``none`` scheme
  (σ uniform), target ``ε - x``, latents packed 2×2 into tokens, the transformer given ``t/1000`` and,
  for guidance-distilled bases, the script's default guidance 3.5.

Everything random comes from the caller's generators (``draw``), so a row's draws are the same whatever
pack it trains in. Conditioning tensors have a leading sample dimension and are stacked per sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from weightzoo.tasks.identity.families import Family, detect_pipeline

Cond = dict[str, torch.Tensor]
FLUX_GUIDANCE = 3.5  # train_dreambooth_lora_flux.py --guidance_scale default (guidance-distilled bases only)
# Text lengths of the scripts' --max_sequence_length defaults (SD3 LoRA: 77, Flux: 512), capped at the
# base's own T5 tokenizer length so a small base is not padded past what it was built for.
MAX_SEQUENCE = {"sd3": 77, "flux": 512}


def denoiser(pipe: object) -> nn.Module:
    """The module LoRAs adapt: the UNet (sd, sdxl) or the transformer (sd3, flux). By attribute, so that a
    bare holder of a UNet (a layout computed at a real model's size without building a pipeline) serves."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def default_resolution(pipe: object) -> int:
    """The base's native resolution in pixels: its denoiser's sample size times the VAE's factor. Flux's
    transformer has no sample size; its VAE's (1024 for FLUX.1, the tiny base's own) says the same."""
    size = denoiser(pipe).config.get("sample_size")
    return int(size) * int(pipe.vae_scale_factor) if size else int(pipe.vae.config.sample_size)


class Objective(ABC):
    """One family's loss on a loaded pipeline: encode prompts once, draw timesteps per row, score samples."""

    def __init__(self, pipe: object, family: Family, resolution: int) -> None:
        self.pipe, self.family, self.resolution = pipe, family, resolution

    @property
    def device(self) -> torch.device:
        return denoiser(self.pipe).device

    @abstractmethod
    def encode(self, prompt: str) -> Cond:
        """The conditioning of one prompt, every tensor of shape (1, ...), float32."""

    @abstractmethod
    def draw(self, g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        """Per-sample timestep indices (long) from ``g``."""

    @abstractmethod
    def losses(self, forward: Callable, latents: torch.Tensor, noise: torch.Tensor, index: torch.Tensor,
               cond: Cond, autocast: Callable) -> torch.Tensor:
        """Per-sample loss (n,) of one forward of ``forward`` (the denoiser, possibly compiled)."""

    def hparams(self) -> dict:
        """What a row records about the objective."""
        return {"family": self.family.name, "objective": self.family.objective, "timesteps": self.family.timesteps}


def _per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


class DDPMObjective(Objective):
    """sd and sdxl: noise (or v) prediction with timesteps uniform over the DDPM training schedule."""

    def __init__(self, pipe: object, family: Family, resolution: int) -> None:
        super().__init__(pipe, family, resolution)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def encode(self, prompt: str) -> Cond:
        pipe = self.pipe
        if self.family.name == "sd":  # one prompt per call: exact and order-free
            return {"encoder_hidden_states": encode_sd_prompt(pipe, prompt)}
        with torch.no_grad():
            ehs, _, pooled, _ = pipe.encode_prompt(prompt, device=pipe.text_encoder_2.device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32)  # original size, crop (0, 0), target
        return {"encoder_hidden_states": ehs.float(), "text_embeds": pooled.float(), "time_ids": time_ids}

    def draw(self, g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, shape, generator=g)

    def losses(self, forward: Callable, latents: torch.Tensor, noise: torch.Tensor, index: torch.Tensor,
               cond: Cond, autocast: Callable) -> torch.Tensor:
        sched, dtype = self.scheduler, denoiser(self.pipe).dtype
        noisy = sched.add_noise(latents, noise, index)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, index)
        kwargs: dict = {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype)}
        if "text_embeds" in cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(dtype),
                                           "time_ids": cond["time_ids"].to(dtype)}
        with autocast():
            pred = forward(noisy.to(dtype), index, **kwargs, return_dict=False)[0]
        return _per_sample(pred, target)


class FlowObjective(Objective):
    """sd3 and flux: rectified flow, σ drawn by the family's density (see the module docstring)."""

    def __init__(self, pipe: object, family: Family, resolution: int) -> None:
        super().__init__(pipe, family, resolution)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        tokenizer = pipe.tokenizer_3 if family.name == "sd3" else pipe.tokenizer_2
        self.max_sequence = min(MAX_SEQUENCE[family.name], int(tokenizer.model_max_length))
        self._ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(self, prompt: str) -> Cond:
        pipe = self.pipe
        with torch.no_grad():
            if self.family.name == "sd3":
                ehs, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence)
            else:
                ehs, pooled, _ = pipe.encode_prompt(prompt, None, device=self.device,
                                                    max_sequence_length=self.max_sequence)
        return {"encoder_hidden_states": ehs.float(), "pooled_projections": pooled.float()}

    def draw(self, g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        n = self.scheduler.config.num_train_timesteps
        if self.family.timesteps == "logit_normal":
            u = torch.sigmoid(torch.randn(shape, generator=g))  # logit_mean 0, logit_std 1
        else:
            u = torch.rand(shape, generator=g)
        return (u * n).long().clamp_max(n - 1)

    def losses(self, forward: Callable, latents: torch.Tensor, noise: torch.Tensor, index: torch.Tensor,
               cond: Cond, autocast: Callable) -> torch.Tensor:
        model, sched = denoiser(self.pipe), self.scheduler
        dtype = model.dtype
        idx = index.cpu()
        timesteps = sched.timesteps[idx].to(latents.device)
        sigmas = sched.sigmas[idx].to(latents.device, torch.float32).view(-1, *[1] * (latents.ndim - 1))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        ehs, pooled = cond["encoder_hidden_states"].to(dtype), cond["pooled_projections"].to(dtype)
        if self.family.name == "sd3":
            with autocast():
                pred = forward(hidden_states=noisy.to(dtype), timestep=timesteps, encoder_hidden_states=ehs,
                               pooled_projections=pooled, return_dict=False)[0]
            pred = pred.float() * (-sigmas) + noisy  # precondition_outputs=1: predict x
            return _per_sample(pred, latents)
        n, c, h, w = latents.shape
        packed = noisy.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)
        img_ids, txt_ids = self._position_ids(h, w, ehs.shape[1], latents.device, dtype)
        guidance = (torch.full((n,), FLUX_GUIDANCE, device=latents.device)
                    if model.config.get("guidance_embeds") else None)
        with autocast():
            pred = forward(hidden_states=packed.to(dtype), timestep=timesteps / 1000, guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=ehs,
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        pred = pred.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
        return _per_sample(pred, noise - latents)

    def _position_ids(self, h: int, w: int, text: int, device: torch.device, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flux's (row, column) ids of the packed latent tokens and its all-zero text ids: the same every
        step of a batch, so made once per shape."""
        key = (h, w, text, device, dtype)
        if key not in self._ids:
            img = torch.zeros(h // 2, w // 2, 3)
            img[..., 1] += torch.arange(h // 2)[:, None]
            img[..., 2] += torch.arange(w // 2)[None, :]
            self._ids[key] = (img.reshape(-1, 3).to(device, dtype), torch.zeros(text, 3, device=device, dtype=dtype))
        return self._ids[key]

    def hparams(self) -> dict:
        extra = {"max_sequence_length": self.max_sequence}
        if self.family.name == "sd3":
            extra["precondition_outputs"] = True
        elif denoiser(self.pipe).config.get("guidance_embeds"):
            extra["guidance"] = FLUX_GUIDANCE
        return super().hparams() | extra


@torch.no_grad()
def encode_sd_prompt(pipe: object, prompt: str) -> torch.Tensor:
    """SD 1.x/2.x: the (1, L, D) text embedding the UNet is conditioned on (the text encoder's last state)."""
    tok = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0].float()


def objective(pipe: object, resolution: int) -> Objective:
    """The training objective of ``pipe``'s family."""
    family = detect_pipeline(pipe)
    cls = DDPMObjective if family.objective == "ddpm" else FlowObjective
    return cls(pipe, family, resolution)
