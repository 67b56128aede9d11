"""Tiny offline pipelines of each supported base family (SD, SDXL, SD3, Flux), built from code.

Each one keeps its family's pipeline class, module names, text encoders, scheduler and latent format, at a
fraction of the width, so that LoRA layouts, caching, training steps, export and ``load_lora_weights`` run the
real code paths on a CPU in tests. Nothing is downloaded: configs are in this file, weights are random.

Native sizes: SD and SDXL 64 px (4×32×32 latents); SD3 and Flux 32 px (16×16×16 latents; Flux packs 2×2
into 64 tokens). ``pipe(...)`` generates at the native size without height/width for SD, SDXL and SD3; Flux
callers must pass ``height=32, width=32`` (see ``_build_flux``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from weightzoo.tasks.identity import base_model
from weightzoo.tasks.identity.families import FAMILIES as _FAMILIES
from weightzoo.tasks.identity.families import get
from weightzoo.tasks.identity.tokenizers import write_byte_tokenizer

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)  # the families' table (families.py) is the one list

TINY_RESOLUTION: dict[str, int] = {"sd": 64, "sdxl": 64, "sd3": 32, "flux": 32}  # pixels; tiny VAEs halve


# Real-size configs with random weights, for the GPU memory/throughput check only (never built in tests).
# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, minus bookkeeping keys).
SDXL_UNET: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' historical name: these are head counts (heads of 64)
    "cross_attention_dim": 2048,  # CLIP ViT-L (768) + OpenCLIP bigG (1280) hidden states, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # bigG's pooled 1280 + 6 size/crop ids × 256
    "norm_num_groups": 32,
}
# FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev transformer/config.json).
FLUX_TRANSFORMER: dict = {
    "patch_size": 1,  # the pipeline packs 2×2 latent patches itself: 16 latent channels × 4 = 64 in
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL hidden size
    "pooled_projection_dim": 768,  # CLIP ViT-L pooled output
    "guidance_embeds": True,  # dev is guidance-distilled; schnell has False
    "axes_dims_rope": (16, 56, 56),  # sums to attention_head_dim
}


# Tiny configs. Text encoders: CLIP from base_model's TINY_TEXT (hidden 32, 2 layers: the pipelines read the
# penultimate hidden state, so one layer would hand them the raw embeddings); T5 wide enough for SD3, which
# zero-pads both CLIPs' concatenated hidden states (32 + 32) up to T5's width.
TINY_CLIP_PROJECTION = 32  # CLIPTextModelWithProjection's pooled width
TINY_T5: dict = {
    "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
    "feed_forward_proj": "gated-gelu",  # T5 v1.1, the variant SD3 and Flux ship
    "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}
# The pipelines pad T5 prompts to their own max_sequence_length (SD3 256, Flux 512) whatever this says;
# 512 is what the real T5 tokenizers declare, so direct calls behave the same.
T5_MAX_LENGTH = 512


def _tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None, pixels: int) -> AutoencoderKL:
    """Two blocks: a 2× downsampling VAE, so tiny images give tiny latents of the family's channel count.
    ``pixels``: the native size, recorded as the VAE's sample size as the real ones do (Flux's only record of it)."""
    flow = latent_channels == 16  # SD3's and Flux's VAEs drop the 1×1 quant convs
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=pixels, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=not flow, use_post_quant_conv=not flow,
    )


def _clip_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return write_byte_tokenizer(Path(tmp))


def _clip(tokenizer: CLIPTokenizer, projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), projection_dim=TINY_CLIP_PROJECTION, **base_model.TINY_TEXT
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5_tokenizer() -> T5TokenizerFast:
    """A unigram T5 tokenizer over printable ASCII: every piece is one character, "▁"-prefixed at word starts.

    Any ASCII prompt tokenises (other characters become <unk>); ids 0/1/2 are <pad>, </s>, <unk> as in T5.
    """
    chars = [chr(c) for c in range(33, 127)]
    # Equal scores: the best segmentation is the one with fewest pieces, i.e. "▁c" + single characters.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -1.0) for c in chars] + [(c, -1.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _t5(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TINY_T5))


def _build_sdxl() -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    time_dim = 8  # per size/crop id; SDXL uses 256
    unet = UNet2DConditionModel(
        sample_size=base_model.TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        # SDXL's shape: no attention at the highest resolution, several transformer layers deeper down.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(4, 8), use_linear_projection=True,
        cross_attention_dim=2 * base_model.TINY_TEXT["hidden_size"],  # both encoders' hidden states, joined
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TINY_CLIP_PROJECTION + 6 * time_dim,  # pooled + 6 ids
        norm_num_groups=32,
    )
    vae = _tiny_vae(4, scaling_factor=0.13025, shift_factor=None, pixels=64)  # SDXL VAE's scaling factor
    text_encoder, text_encoder_2 = _clip(tokenizer, projection=False), _clip(tokenizer_2, projection=True)
    # SDXL base's scheduler_config.json: Euler, epsilon prediction, scaled-linear betas, "leading" spacing.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )


def _build_sd3() -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), t5_tokenizer()
    heads, head_dim = 2, 16
    transformer = SD3Transformer2DModel(
        sample_size=16,  # latent pixels: the pipeline's default size is sample_size × VAE factor 2 = 32 px
        patch_size=2, in_channels=16, out_channels=16,
        num_layers=2,  # the last joint block is context-only: two layers give both block kinds
        attention_head_dim=head_dim, num_attention_heads=heads, caption_projection_dim=heads * head_dim,
        joint_attention_dim=TINY_T5["d_model"],
        pooled_projection_dim=2 * TINY_CLIP_PROJECTION,  # both CLIPs' pooled outputs, concatenated
        pos_embed_max_size=16,  # patches per side it can place: up to 64 px
    )
    vae = _tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, pixels=32)  # SD3 VAE's latent normalisation
    text_encoder, text_encoder_2 = _clip(tokenizer, projection=True), _clip(tokenizer_2, projection=True)
    text_encoder_3 = _t5(tokenizer_3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # as SD3 ships
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux() -> FluxPipeline:
    """Flux at 32 px. FluxPipeline's default size is a hard-coded ``default_sample_size = 128`` latent pixels
    (not read from any config), i.e. 256 px with this 2× VAE: callers pass ``height=32, width=32``."""
    tokenizer, tokenizer_2 = _clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64,  # 16 latent channels packed 2×2 by the pipeline
        num_layers=1, num_single_layers=1,  # one double-stream and one single-stream block
        attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TINY_T5["d_model"],
        pooled_projection_dim=base_model.TINY_TEXT["hidden_size"],  # CLIPTextModel's pooled output
        guidance_embeds=True,  # like FLUX.1-dev
        axes_dims_rope=(4, 6, 6),  # (text/id, row, column), even, summing to attention_head_dim
    )
    vae = _tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159, pixels=32)  # Flux VAE's latent normalisation
    text_encoder, text_encoder_2 = _clip(tokenizer, projection=False), _t5(tokenizer_2)
    # FLUX.1-dev's scheduler_config.json: the shift grows with the image's token count (mu from the pipeline).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


_BUILDERS = {"sdxl": _build_sdxl, "sd3": _build_sd3, "flux": _build_flux}


def build_tiny_pipeline(
    family: str = "sd", seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline | StableDiffusion3Pipeline | FluxPipeline:
    """A tiny random pipeline of ``family``'s class and module names, the same for the same seed.

    Seeded once, then the denoiser, VAE and text encoders are built in a fixed order, so a seed always
    gives the same weights. "sd" is ``base_model.build_tiny_pipeline`` unchanged.
    """
    get(family)  # an unknown family: one line naming the known ones
    if family == "sd":
        return base_model.build_tiny_pipeline(seed)
    torch.manual_seed(seed)
    return _BUILDERS[family]()


def save_tiny_pipeline(out_dir: str | os.PathLike, family: str = "sd", seed: int = 0) -> Path:
    """Build the tiny ``family`` pipeline and ``save_pretrained`` it (safetensors) to ``out_dir``, without
    transformers' "Writing model shards" bar (a few-MB base needs none, and it would land on a user's stderr)."""
    from transformers.utils import logging as transformers_logging

    out = Path(out_dir)
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        build_tiny_pipeline(family, seed).save_pretrained(out, safe_serialization=True)
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
    return out
