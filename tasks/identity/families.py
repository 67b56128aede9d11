"""Model families of the identity engine: which diffusers pipelines it trains on, told apart by the base's
``model_index.json`` alone, so users never name the family and nothing loads to check a base.

A family fixes what differs between diffusers' own DreamBooth-LoRA scripts (docs/BASES.md): the denoiser
attribute (``unet`` or ``transformer``), the key prefix a LoRA file carries for ``load_lora_weights``, the
training objective (DDPM noise prediction or flow matching) and its timestep sampling, and the default
LoRA targets. The family is part of every row's recipe, so two families never share a dataset. This module
is torch-free: the CLI checks a base with it at once; the training side lives in ``denoise.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from weightzoo.errors import InputError
from weightzoo.storage.fs import read_index


@dataclass(frozen=True)
class Family:
    """One model family: the pipeline classes it covers and how its LoRA is trained and exported."""

    name: str
    pipelines: tuple[str, ...]  # diffusers pipeline class names (model_index.json "_class_name")
    denoiser: str  # the pipeline attribute LoRAs adapt, and the key prefix of an exported LoRA file
    objective: str  # "ddpm": noise (or v) prediction on a DDPM schedule; "flow": rectified-flow velocity
    # diffusers' DreamBooth-LoRA script's timestep sampling for the family: uniform for DDPM; for flow
    # matching its ``weighting_scheme`` default (SD3: logit_normal; Flux: none, i.e. uniform).
    timesteps: str
    # The script's default LoRA targets; the identity workload keeps weights2weights' (to_q, to_v) on every
    # family (``FinetuneConfig.target_modules``): its rows stay small enough for PCA over many thousands.
    script_targets: tuple[str, ...]


_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
_MMDIT_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd", ("StableDiffusionPipeline",), "unet", "ddpm", "uniform", _UNET_TARGETS),
    Family("sdxl", ("StableDiffusionXLPipeline",), "unet", "ddpm", "uniform", _UNET_TARGETS),
    Family("sd3", ("StableDiffusion3Pipeline",), "transformer", "flow", "logit_normal", _MMDIT_TARGETS),
    Family("flux", ("FluxPipeline",), "transformer", "flow", "uniform",
           (*_MMDIT_TARGETS, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")),
)}
BY_PIPELINE: dict[str, Family] = {p: f for f in FAMILIES.values() for p in f.pipelines}


def get(name: str) -> Family:
    """The family named ``name``; refuses anything else in one line."""
    if name not in FAMILIES:
        raise InputError(f"unknown model family {name!r}; choose {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_index(index: dict, where: str) -> Family:
    """The family of a parsed ``model_index.json`` (``where`` names it in messages)."""
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls not in BY_PIPELINE:
        supported = ", ".join(f"{p} ({f.name})" for p, f in BY_PIPELINE.items())
        raise InputError(f"{where}: pipeline class {cls!r} is not supported; supported: {supported}")
    return BY_PIPELINE[cls]


def detect(base: str) -> Family:
    """The family of the diffusers pipeline folder at ``base`` (any fsspec URI), from its index file."""
    return family_of_index(read_index(base, "model_index.json", "diffusers pipeline"), f"{base}/model_index.json")


def detect_pipeline(pipe: object) -> Family:
    """The family of a loaded pipeline, by its class (a subclass counts as its diffusers parent)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in BY_PIPELINE:
            return BY_PIPELINE[cls.__name__]
    return family_of_index({"_class_name": type(pipe).__name__}, "base")
