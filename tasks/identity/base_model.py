"""The base text-to-image model: build the tiny offline one, or load a diffusers pipeline of a supported
family (SD 1.x/2.x, SDXL, SD3, Flux: ``families.py``) from a path.

Nothing here downloads. ``load_base`` always passes ``local_files_only=True``; a remote (fsspec) base
is copied to a local cache folder first, because diffusers reads from local directories only.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel

from weightzoo.storage.fs import filesystem, is_local
from weightzoo.tasks.identity.families import detect
from weightzoo.tasks.identity.tokenizers import write_byte_tokenizer

TINY_RESOLUTION = 64  # pixels; the tiny VAE downsamples 2x, so latents are 4×32×32


# SD 1.5's UNet and VAE configs (runwayml/stable-diffusion-v1-5 */config.json, minus bookkeeping keys): SD
# 1.5-shaped models with random weights, built without any download, for benches, the GPU check and layout tests.
SD15_UNET: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}


# The tiny pipeline: SD 1.5's module names and block types at a fraction of the width (~1.7M parameters).
TINY_UNET: dict = {
    "sample_size": TINY_RESOLUTION // 2, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D",) * 2,
    "up_block_types": ("CrossAttnUpBlock2D",) * 2, "cross_attention_dim": 32, "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY_VAE: dict = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (32, 64), "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 32, "sample_size": TINY_RESOLUTION,
}
TINY_TEXT: dict = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
}


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A Stable-Diffusion-shaped pipeline of ~1.7M random parameters, built in seconds with no download.

    Same module names as SD 1.5 (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ...),
    so LoRA layouts, export and loading exercise the real code paths.
    """
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_byte_tokenizer(Path(tmp))
    unet = UNet2DConditionModel(**TINY_UNET)  # built in this order: the seed's draws go where they always went
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT))
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, clip_sample=False,
    )
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_pipeline(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it (safetensors) to ``out_dir``."""
    out = Path(out_dir)
    build_tiny_pipeline(seed).save_pretrained(out, safe_serialization=True)
    return out


def _local_copy(uri: str) -> str:
    """A local directory holding the pipeline at ``uri`` (copied once into a cache for remote URIs)."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return path
    cache = Path(os.environ.get("WEIGHTZOO_CACHE", Path.home() / ".cache" / "weightzoo")) / "bases"
    dest = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (dest / "model_index.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        os.replace(tmp, dest)
    return str(dest)


def load_base(uri: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Load a diffusers pipeline of a supported family (``families.py``) from a local path or fsspec URI,
    never from a hub. The class comes from the family table, never from the folder's own say-so."""
    import diffusers

    from weightzoo.tasks.world.base import check_world_base

    local = _local_copy(str(uri))
    family = detect(local)
    check_world_base(local)  # a world base whose files differ from its recorded hashes: refused in one line
    if os.environ.get("TQDM_DISABLE") == "1":  # the CLI without -v (tqdm's own switch): no "Loading pipeline components" bar
        diffusers_logging.disable_progress_bar()
    cls = getattr(diffusers, family.pipelines[0])
    extra = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
    pipe = cls.from_pretrained(local, local_files_only=True, dtype=dtype, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def base_fingerprint(uri: str) -> str:
    """A short hash of every file of the base model: rows record exactly which base they were trained on.

    A world base's hash record (``world_base.sha256.json``) is left out: copies made before it existed
    fingerprint the same. Other families than SD 1.x/2.x prefix it with their name (``sdxl-…``), so a dataset's card and every
    row say the family and a base of another family is refused by name. Reads the whole model once
    (seconds for SD 1.5); callers compute it once per batch, not per item.
    """
    from weightzoo.tasks.world.base import HASHES_FILE

    family = detect(uri)
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    for f in sorted(fs.find(path)):
        rel = f[len(path.rstrip("/")) + 1 :]
        if rel == HASHES_FILE:  # the world base's record of its own files' hashes: nothing new to fingerprint
            continue
        h.update(rel.encode() + b"\0" + fs.cat_file(f))
    return h.hexdigest()[:16] if family.name == "sd" else f"{family.name}-{h.hexdigest()[:16]}"
