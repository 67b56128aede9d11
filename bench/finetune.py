"""Fine-tune throughput: models per hour for today's per-identity baseline versus weightzoo.

Modes, all training the same rows for the same steps (rank-1 LoRA on to_q/to_v, prior preservation):

- baseline: what a user runs today: one process per identity that reloads the base model, attaches
  peft's standard ``unet.add_adapter(LoraConfig(...))``, and in a plain loop VAE-encodes its images
  and text-encodes its prompts every step (as diffusers' DreamBooth-LoRA script does). Class images
  are pre-generated once into a shared folder, as that script does when the folder is full.
- weightzoo pack=K: one process, the base loaded once, inputs cached once, K rows per step
  (K=1 is weightzoo's sequential mode: the same code path).

Each mode's wall time includes loading the base (once per batch for weightzoo, once per identity for
the baseline). Ratios are against the baseline measured in the same run. No assertions: a benchmark
reports. Run: ``.venv/bin/python bench/finetune.py [--steps 20 --items 8 --device cpu --unet tiny]``.

``--unet sd15`` builds a pipeline of SD 1.5's shapes (UNet, VAE, a 12-layer 768-wide text encoder) with
random weights and no download, at 512 px (64x64 latents), for GPU runs. Not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from weightzoo.tasks.finetune.row import ManifestRow
from weightzoo.tasks.identity.base_model import SD15_UNET, SD15_VAE


def save_sd15_shaped(out: Path) -> Path:
    """An SD 1.5-shaped pipeline with random weights (untested on GPU in this repo so far)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from weightzoo.tasks.identity.base_model import build_tiny_pipeline

    tiny = build_tiny_pipeline()  # for its scheduler and offline byte-level tokenizer
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tiny.tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), text_encoder=text, tokenizer=tiny.tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET), scheduler=tiny.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# -- baseline: one process per identity ---------------------------------------------------------------


def baseline_worker(spec: dict) -> None:
    """Train one identity the usual way; prints its final loss as JSON on the last line."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from weightzoo.tasks.finetune.images import load_image
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.identity.class_images import preprocess

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    pipe = load_base(spec["base"], device=device)
    unet, vae, text_encoder, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], init_lora_weights="gaussian",
                                target_modules=spec["targets"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=1e-2)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    instance = [preprocess(load_image(u), spec["resolution"]) for u in spec["images"]]
    classes = [preprocess(load_image(u), spec["resolution"]) for u in spec["class_images"]]
    g = torch.Generator().manual_seed(0)
    bf16 = device.type == "cuda"
    unet.train()
    losses = []
    for step in range(spec["steps"]):
        pixels = torch.stack([instance[step % len(instance)], classes[step % len(classes)]]).to(device)
        ids = tok([spec["prompt"], spec["class_prompt"]], padding="max_length", truncation=True,
                  max_length=tok.model_max_length, return_tensors="pt").input_ids.to(device)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            latents = vae.encode(pixels).latent_dist.sample(generator=g.manual_seed(step)).float()
            latents = latents * vae.config.scaling_factor
            ehs = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (2,), generator=g).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            pred = unet(noise_sched.add_noise(latents, noise, t), t, ehs).sample
        inst, prior = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        (inst + prior).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(inst + prior))
    from peft.utils import get_peft_model_state_dict

    type(pipe).save_lora_weights(spec["out"], unet_lora_layers=get_peft_model_state_dict(unet))
    print(json.dumps({"loss": sum(losses[-5:]) / len(losses[-5:])}))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_baseline(
    rows: list[ManifestRow], root: str, class_files: list[str], args: argparse.Namespace, base: str, res: int,
    work: Path,
) -> tuple[float, float, list[float]]:
    """Wall and CPU seconds (of the worker processes) for one process per identity, and their final losses."""
    from weightzoo.tasks.finetune.row import image_uris

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    losses, start, cpu = [], time.perf_counter(), _children_cpu()
    for row in rows:
        spec = {"base": base, "device": args.device, "threads": args.threads, "rank": 1, "alpha": 27.0,
                "targets": ["to_q", "to_v"], "lr": args.lr, "steps": args.steps, "resolution": res,
                "images": image_uris(row, root), "class_images": class_files, "prompt": row.prompt,
                "class_prompt": row.class_prompt, "out": str(work / "baseline" / row.id)}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                              capture_output=True, text=True, check=True)
        losses.append(json.loads(proc.stdout.strip().splitlines()[-1])["loss"])
    return time.perf_counter() - start, _children_cpu() - cpu, losses


# -- weightzoo ------------------------------------------------------------------------------------------


def run_weightzoo(
    rows: list[ManifestRow], root: str, args: argparse.Namespace, base: str, cache: str, pack: int, res: int,
    n_class: int,
) -> tuple[float, float, object]:
    """Wall and CPU seconds to load the base once and fine-tune every row in packs of ``pack``."""
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.engine import finetune_batch

    cfg = FinetuneConfig(steps=args.steps, learning_rate=args.lr, pack=pack, resolution=res,
                         num_class_images=n_class, class_inference_steps=args.class_steps)
    start, cpu = time.perf_counter(), time.process_time()
    pipe = load_base(base, device=args.device)
    out = finetune_batch(pipe, rows, cfg, base_uri=root, cache_dir=cache)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, out


def main() -> None:
    """Parse options, prepare the base, rows and shared class images, time each mode, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--unet", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--packs", default="1,2,4,8", help="comma-separated pack sizes for weightzoo")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: the base's own: 64 tiny, 512 sd15)")
    ap.add_argument("--class-images", type=int, default=8)
    ap.add_argument("--class-steps", type=int, default=4, help="sampling steps for the shared class images")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        baseline_worker(json.loads(args.worker))
        return
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="wz-bench-"))
    try:
        _bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # an SD 1.5-shaped base is ~4 GB


def _bench(args: argparse.Namespace, work: Path) -> None:
    """Everything after option parsing, in a scratch folder the caller removes."""
    from weightzoo.tasks.identity.base_model import load_base, save_tiny_pipeline
    from weightzoo.tasks.identity.class_images import generate_class_images
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.engine import default_resolution, finetune_batch
    from weightzoo.tasks.identity.synthetic import make_subjects

    base = str(save_tiny_pipeline(work / "base") if args.unet == "tiny" else save_sd15_shaped(work / "base"))
    pipe = load_base(base, device=args.device)
    res = args.resolution or default_resolution(pipe)
    rows = make_subjects(str(work / "data"), args.items, images_per_subject=4, size=res)
    root, cache = str(work / "data"), str(work / "cache")

    # Shared class images, once, outside every timing: both sides reuse them (folder / latent cache).
    warm = FinetuneConfig(steps=1, resolution=res, num_class_images=args.class_images,
                          class_inference_steps=args.class_steps)
    finetune_batch(pipe, rows[:1], warm, base_uri=root, cache_dir=cache)
    class_dir = work / "class"
    class_dir.mkdir()
    class_files = []
    for i, im in enumerate(generate_class_images(pipe, "person", args.class_images, res, args.class_steps, 7.5, 0)):
        im.save(class_dir / f"{i:04d}.png")
        class_files.append(str(class_dir / f"{i:04d}.png"))
    del pipe

    print(f"# {args.items} models x {args.steps} steps, {args.unet} UNet at {res}px, device {args.device}, "
          f"{args.threads} torch threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
          flush=True)
    table: list[tuple[str, float, float, float]] = []
    if not args.skip_baseline:
        secs, cpu, losses = run_baseline(rows, root, class_files, args, base, res, work)
        table.append(("baseline: process per identity, peft add_adapter", secs, cpu, sum(losses) / len(losses)))
        print(f"baseline done in {secs:.1f}s", flush=True)
    ref = None
    for pack in [int(p) for p in args.packs.split(",")]:
        secs, cpu, out = run_weightzoo(rows, root, args, base, cache, pack, res, args.class_images)
        ok = [r for r in out.results if r.ok]
        name = f"weightzoo pack={pack}" + (" (sequential)" if pack == 1 else "")
        table.append((name, secs, cpu, sum(r.loss for r in ok) / max(1, len(ok))))
        w = torch.stack([r.weights.float() for r in ok])
        rel = None if ref is None else float(((w - ref).norm(dim=1) / ref.norm(dim=1)).max())
        drift = "" if rel is None else f", weights vs first weightzoo run: max rel. diff {rel:.1e}"
        ref = w if ref is None else ref
        print(f"{name} done in {secs:.1f}s{drift}", flush=True)

    base_secs, base_cpu = table[0][1], table[0][2]
    print(f"# load average {os.getloadavg()[0]:.1f} at end")
    # CPU seconds (with one torch thread) are robust to other jobs on a shared machine; wall is what a user waits.
    print("\n| mode | wall s | models/hour (wall) | vs first row (wall) | CPU s | vs first row (CPU) | final loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, secs, cpu, loss in table:
        print(f"| {name} | {secs:.1f} | {args.items * 3600 / secs:.0f} | {base_secs / secs:.2f}x | {cpu:.1f} | "
              f"{base_cpu / cpu:.2f}x | {loss:.3f} |")


if __name__ == "__main__":
    main()
