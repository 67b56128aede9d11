"""World LoRA recipes on validation identities: which recipe's rows draw their own labels best?

The identity world bench's ceiling is how well the identities' own LoRAs draw their labels; every claim
(samples, edits, inversion) inherits it. This bench chooses the recipe on **validation identities**
(``--seed 2`` by default, never the bench's draws 0 and 1): each recipe of ``RECIPES`` trains ``--identities``
world identities on the shipped world base (the same ``run_batch`` path as ``bench/identity_world.py``),
and the pixel reader reads ``--pictures`` pictures of each LoRA: agreement overall and per attribute, and
the seconds each recipe's rows took (its cost beside the others).

Run: ``.venv/bin/python bench/world_recipe.py --threads 2`` (16 identities, 1.5-5 min per recipe on 2 cores).
Datasets are kept under ``--work`` by recipe name, so a rerun only measures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.finetune.batch import run_batch
from weightzoo.tasks.finetune.readers import read_manifest
from weightzoo.tasks.identity.base_model import load_base
from weightzoo.tasks.world.base import build_world_base
from weightzoo.tasks.world.identities import (
    PROMPT,
    generate,
    lora_loaded,
    world_finetune_config,
    write_world_manifest,
)
from weightzoo.tasks.world.render import ATTRIBUTES, read

# name -> the recipe's settings over tasks/world/config.py WORLD_FINETUNE (300 steps at 1e-3, rank 1, to_q/to_v,
# no prior preservation; 32 class images where it is on). Rank and targets stay w2w's: they set the row layout.
# Each states its prior setting, so a recipe's name keeps meaning one thing whatever the default is.
RECIPES: dict[str, dict] = {
    "prior": {"prior_preservation": True},
    "600 steps, prior": {"steps": 600, "prior_preservation": True},
    "lr 2e-3, prior": {"learning_rate": 2e-3, "prior_preservation": True},
    "no prior": {"prior_preservation": False},
    "600 steps, no prior": {"steps": 600, "prior_preservation": False},
    "lr 2e-3, no prior": {"learning_rate": 2e-3, "prior_preservation": False},
}


def measure(pipe, dataset: str, pictures: int, seed: int) -> dict[str, float]:
    """Mean reader agreement of each row's pictures with its labels, overall and per attribute."""
    ds = Dataset(dataset)
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for item in ds.ids:
        meta, w = ds.row(item)
        labels = dict(meta["attributes"])
        with lora_loaded(pipe, w, ds.layout, dict(meta["hparams"])):
            for got in map(read, generate(pipe, PROMPT, pictures, seed)):
                for a in ATTRIBUTES:
                    hits[a].append(got[a] == labels[a])
    out = {a: float(np.mean(v)) for a, v in hits.items()}
    return {"agreement": float(np.mean(list(out.values()))), **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/world_recipe")
    p.add_argument("--bases", default="work/identity_world/bases", help="where the world base is kept (shared)")
    p.add_argument("--identities", type=int, default=16, help="8 read too noisily to rank recipes (±0.1)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seed", type=int, default=2, help="the validation draw (the identity world bench runs draws 0 and 1)")
    p.add_argument("--pictures", type=int, default=2)
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                   help="recipes measured (default: all)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    base = build_world_base(args.bases)
    data = Path(args.work) / f"draw{args.seed}-n{args.identities}-img{args.images}"
    manifest = data / "manifest.jsonl"
    if not manifest.exists():
        write_world_manifest(str(data), args.identities, args.images, args.seed)
    ids = [r.id for r in read_manifest(str(manifest))]
    pipe = load_base(str(base))
    rows = []
    for name in args.recipes:
        out = data / name.replace(" ", "").replace(",", "-")
        t0 = time.perf_counter()
        run_batch("b-recipe", ids, str(manifest), str(base), str(out), world_finetune_config(pack=8, **RECIPES[name]),
                  cache_dir=str(data / "cache"))
        seconds = time.perf_counter() - t0
        rows.append((name, measure(pipe, str(out), args.pictures, args.seed), seconds))
        print(f"{name}: {rows[-1][1]['agreement']:.3f} ({seconds:.0f} s)", flush=True)
    print(f"\nworld LoRA recipes: {args.identities} validation identities (draw {args.seed}), {args.pictures} pictures each")
    print("| recipe | agreement | " + " | ".join(ATTRIBUTES) + " | s for the rows (0: kept) |")
    print("|---|---:|" + "---:|" * len(ATTRIBUTES) + "---:|")
    for name, m, seconds in rows:
        print(f"| {name} | {m['agreement']:.2f} | " + " | ".join(f"{m[a]:.2f}" for a in ATTRIBUTES) + f" | {seconds:.0f} |")


if __name__ == "__main__":
    main()
