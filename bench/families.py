"""Per model family: rows per second trained packed (``pack=K``) against sequentially (``pack=1``), the
same rows and steps in one process, and how far the packed rows are from the sequential ones.

    .venv/bin/python bench/families.py                     # tiny bases on CPU (sd, sdxl, sd3, flux)
    .venv/bin/python bench/families.py --size real --device cuda --families sdxl flux   # bench/gpu_check.py

``--size tiny`` trains on each family's tiny offline base (tasks/identity/tiny_bases.py). ``--size real``
swaps in the denoiser at its real architecture size (``SDXL_UNET``, ``FLUX_TRANSFORMER``: random weights,
no download) behind light text encoders of the real widths and the tiny 2x VAE, at a resolution that gives
the real model's latents (SDXL at 256 px: 128x128, as at 1024 px; Flux at 128 px: 64x64, 1,024 tokens, as
at 512 px), so the denoiser's cost is what is measured. Peak memory is reported on CUDA.
Ratios, measured in one run; no assertions: a benchmark reports.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.engine import finetune_batch
from weightzoo.tasks.identity.synthetic import make_subjects
from weightzoo.tasks.identity.tiny_bases import FAMILIES, TINY_RESOLUTION, build_tiny_pipeline

REAL_RESOLUTION = {"sdxl": 256, "flux": 128}  # with the tiny 2x VAE: SDXL's 128x128 latents; Flux's 64x64


def real_sized(family: str, dtype: torch.dtype):
    """The tiny ``family`` pipeline with its denoiser at real architecture size (random weights) and text
    encoders of the real widths (one layer each): the training step costs what the real model's does."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from weightzoo.tasks.identity.tiny_bases import FLUX_TRANSFORMER, SDXL_UNET

    pipe = build_tiny_pipeline(family)
    clip = {"intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 77,
            "vocab_size": len(pipe.tokenizer), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    if family == "sdxl":
        pipe.unet = UNet2DConditionModel(**{**SDXL_UNET, "in_channels": 4, "out_channels": 4})
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, **clip))
        pipe.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, projection_dim=1280, **clip))
    elif family == "flux":
        pipe.transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
        pipe.text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, **clip))
        t5 = pipe.text_encoder_2.config.to_dict() | {"d_model": 4096, "num_layers": 1, "d_ff": 64, "num_heads": 4, "d_kv": 16}
        pipe.text_encoder_2 = T5EncoderModel(T5Config(**t5))
    else:
        raise SystemExit(f"--size real knows sdxl and flux, not {family}")
    return pipe.to(dtype=dtype)


def measure(family: str, size: str, device: str, items: int, steps: int, pack: int, work: Path,
            repeats: int = 2) -> dict:
    """Train ``items`` rows packed and sequentially on ``family``; rows/s each, their ratio and the gap."""
    # Real sizes in bf16 (Flux's 12B parameters take 48 GB in fp32); adapters train in fp32 either way.
    dtype = torch.bfloat16 if size == "real" and device.startswith("cuda") else torch.float32
    pipe = (build_tiny_pipeline(family) if size == "tiny" else real_sized(family, dtype)).to(device)
    resolution = TINY_RESOLUTION[family] if size == "tiny" else REAL_RESOLUTION[family]
    rows = make_subjects(str(work / family), items, images_per_subject=2, seed=0, size=resolution)
    cfg = FinetuneConfig(steps=steps, resolution=resolution, prior_preservation=False, weights_dtype="float32",
                         check_every=steps, loss_window=2, pack=pack, learning_rate=1e-3)
    out: dict = {"family": family}
    results = {}
    finetune_batch(pipe, rows[:1], cfg.model_copy(update={"steps": 1, "pack": 1}), base_uri=str(work / family))  # warm-up
    for k in (pack, 1) * repeats:  # alternated, best of: a busy neighbour slows one run, not a mode
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        results[k] = finetune_batch(pipe, rows, cfg.model_copy(update={"pack": k}), base_uri=str(work / family))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            out[f"peak_gib_{k}"] = torch.cuda.max_memory_allocated() / 2**30
        out[f"rows_s_{k}"] = max(out.get(f"rows_s_{k}", 0.0), items / (time.perf_counter() - t0))
    gaps = [float((p.weights - s.weights).norm() / s.weights.norm())
            for p, s in zip(results[pack].results, results[1].results, strict=True) if p.ok and s.ok]
    out["ratio"] = out[f"rows_s_{pack}"] / out["rows_s_1"]
    out["max_rel_gap"] = max(gaps) if gaps else float("nan")
    out["ok"] = sum(r.ok for r in results[pack].results)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--size", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pack", type=int, default=4)
    args = ap.parse_args()
    print(f"| family | rows/s packed (pack={args.pack}) | rows/s sequential | packed / sequential | "
          "max rel. gap packed vs sequential | rows ok | peak GiB packed / sequential |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            r = measure(family, args.size, args.device, args.items, args.steps, args.pack, Path(tmp))
            peak = (f"{r[f'peak_gib_{args.pack}']:.2f} / {r['peak_gib_1']:.2f}" if "peak_gib_1" in r else "-")
            print(f"| {family} | {r[f'rows_s_{args.pack}']:.3f} | {r['rows_s_1']:.3f} | {r['ratio']:.2f}x | "
                  f"{r['max_rel_gap']:.1e} | {r['ok']}/{args.items} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
