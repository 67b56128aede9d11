"""Identity rows in one chart: weights2weights' captured variance of held-out rows, ``lora`` against ``lora_fa``.

The same ``--n`` training identities and ``--heldout`` held-out ones (synthetic subjects drawn by
``tasks/identity/synthetic.py``, DreamBooth-LoRA rows on the tiny Stable-Diffusion-style base the tests
build) are trained once per recipe in ``--methods`` through ``run_batch`` (the build path): ``lora`` trains
A and B from the shared Gaussian A; ``lora_fa`` freezes A to one seeded orthogonal basis per layer shared by
every row (the layout rebuilds it) and stores B only. A PCA subspace (tasks/subspace) is fitted on each
recipe's training rows, and the table gives the share of each held-out row's standardised norm² it
captures at k = ``--ks`` (as bench/identity_world.py's projection; a k above n - 1 is capped), plus the row size
and the training time. Rows that are a smooth function of the identity put held-out rows inside the span
of the training rows; factors that wander (A and B trading scale and rotation) do not.

Base, manifest, datasets and subspaces live under ``--work`` in folders named by their settings, so a
rerun reuses them. Run: ``.venv/bin/python bench/identity_chart.py`` (160 + 16 identities, 50 steps per
recipe, the full measurement: ~0.1-0.2 s per identity-step on 2 shared cores measured in the smoke, so
roughly 30-60 min for both recipes); smoke: ``--n 8 --heldout 2 --steps 5 --ks 2 4`` (~40 s).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.finetune.batch import plan_batches, run_batch
from weightzoo.tasks.finetune.readers import read_manifest
from weightzoo.tasks.identity.base_model import save_tiny_pipeline
from weightzoo.tasks.identity.config import FinetuneConfig
from weightzoo.tasks.identity.synthetic import write_demo_manifest
from weightzoo.tasks.subspace.pca import SubspaceConfig, fit_subspace, load_subspace


def build_rows(args: argparse.Namespace, work: Path, method: str) -> tuple[str, str, float]:
    """The recipe's training and held-out datasets (trained once, reused); seconds spent training now."""
    base = work / "tiny-base"
    if not (base / "model_index.json").exists():
        save_tiny_pipeline(base)
    data = work / f"n{args.n}-h{args.heldout}-img{args.images}-px{args.size}"
    manifest = data / "manifest.jsonl"
    if not manifest.exists():
        write_demo_manifest(str(data), args.n + args.heldout, images_per_subject=args.images, size=args.size)
    ids = [r.id for r in read_manifest(str(manifest))]
    cfg = FinetuneConfig(method=method, steps=args.steps, learning_rate=args.lr, pack=8, resolution=args.size,
                         num_class_images=4, class_inference_steps=2, weights_dtype="float32")
    runs = data / f"{method}-steps{args.steps}-lr{args.lr}"
    t0 = time.perf_counter()
    for name, part in (("train", ids[: args.n]), ("heldout", ids[args.n :])):
        for plan in plan_batches(part, 32):
            run_batch(plan.batch_id, plan.ids, str(manifest), str(base), str(runs / name), cfg,
                      cache_dir=str(data / "cache"))
    return str(runs / "train"), str(runs / "heldout"), time.perf_counter() - t0


def captured(train_uri: str, heldout_uri: str, ks: list[int]) -> dict[int, float]:
    """Mean share of each held-out row's standardised norm² (z = (x - mean) / std) in the top-k components."""
    k = max(ks)
    sub_uri = f"{train_uri}-subspace-k{k}"
    if not Path(sub_uri, "card.json").exists():
        fit_subspace(train_uri, sub_uri, SubspaceConfig(components=k, device="cpu"))
    sub, ds = load_subspace(sub_uri), Dataset(heldout_uri)
    z = torch.stack([(torch.from_numpy(ds.row(i)[1].astype(np.float32)) - sub.mean) / sub.std for i in ds.ids])
    return {x: float(((z @ sub.components[:x].T).square().sum(1) / z.square().sum(1)).mean()) for x in ks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/identity_chart")
    p.add_argument("--n", type=int, default=160, help="training identities (k = 128 needs more than 128)")
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--images", type=int, default=2, help="training images per identity")
    p.add_argument("--size", type=int, default=32, help="image size (pixels)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--methods", nargs="+", default=["lora", "lora_fa"])
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    work = Path(args.work)
    shown = sorted({min(x, args.n - 1) for x in args.ks})
    table = {}
    for method in args.methods:
        train_uri, heldout_uri, seconds = build_rows(args, work, method)
        table[method] = (Dataset(train_uri).layout.numel, seconds, captured(train_uri, heldout_uri, shown))
    print(f"\nidentity chart: {args.n} training identities, {args.heldout} held out, {args.steps} steps at lr {args.lr}")
    print("| recipe | values per row | " + " | ".join(f"captured @ k={x}" for x in shown) + " | trained this run, s |")
    print("|---|---:|" + "---:|" * len(shown) + "---:|")
    for method, (numel, seconds, figures) in table.items():
        cells = " | ".join(f"{figures[x]:.3f}" for x in shown)
        print(f"| {method} | {numel:,} | {cells} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
