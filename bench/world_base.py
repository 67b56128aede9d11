"""World bases against the shipped one: does a base of more UNet steps, or a larger pool of renders, draw
every prompted attribute (#32's goal: prompt agreement >= 0.90 for shape as for the rest)?

Each ``--bases`` entry ``STEPS:POOL`` is a world base of those UNet steps and captioned renders (the VAE, the
seed and everything else as the default, tasks/world/config.py ``WorldBaseSettings``); the default settings'
base is the shipped one (copied, not rebuilt). Missing bases are pretrained by the same code path as
``weightzoo base --kind world --rebuild``, ``--jobs`` at a time, each on ``--build-threads`` torch threads
(1 by default, the shipped base's setting), and kept under ``--work``: a rerun only measures. Each base then
draws ``--prompts`` fully specified prompts at each of ``--sample-steps`` DPM-Solver steps (guidance 4, the
world's) and the
pixel reader scores every attribute; shape is also split by size (small shapes, 7 px half-width, are where
the shipped base draws rounded lumps).

    .venv/bin/python bench/world_base.py                          # > 70 min on 2 cores (two 8,000-step builds)
    .venv/bin/python bench/world_base.py --bases 4000:2048 8000:2048 --jobs 1 --build-threads 2   # one build
    .venv/bin/python bench/world_base.py --bases 4000:2048 --sample-steps 20 50   # the shipped base only: a minute
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from weightzoo.tasks.world.config import GUIDANCE, WorldBaseSettings
from weightzoo.tasks.world.render import ATTRIBUTES

COLUMNS = [*ATTRIBUTES, "all", "shape|small", "shape|large"]


def settings(spec: str) -> WorldBaseSettings:
    steps, pool = (int(x) for x in spec.split(":"))
    return WorldBaseSettings(steps=steps, pool=pool)


def build(out: str, s: WorldBaseSettings, threads: int = 1) -> str:
    """One base, in a process of its own, on ``threads`` torch threads (the shipped base's: 1)."""
    import torch

    from weightzoo.tasks.world.base import build_world_base

    torch.set_num_threads(threads)
    return str(build_world_base(out, **s.as_dict()))


def measure(base: str, prompts: int, sample_steps: int, seed: int) -> dict[str, float]:
    """Per attribute: the share of pictures read as prompted; shape also by the prompted size."""
    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.world.evaluate import prompt_reads, read_accuracy

    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    pairs = prompt_reads(pipe, prompts, seed, sample_steps, GUIDANCE)
    out = read_accuracy(pairs)
    for size in ATTRIBUTES["size"]:
        hits = [got["shape"] == want["shape"] for want, got in pairs if want["size"] == size]
        out[f"shape|{size}"] = float(np.mean(hits)) if hits else float("nan")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="work/world_base")
    p.add_argument("--bases", nargs="+", default=["4000:2048", "8000:2048", "8000:8192"],
                   help="STEPS:POOL per base (UNet steps, captioned renders); the default 4000:2048 is the shipped one")
    p.add_argument("--sample-steps", type=int, nargs="+", default=[20])
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--seed", type=int, default=0, help="the prompts' draw")
    p.add_argument("--jobs", type=int, default=2, help="bases pretrained at once")
    p.add_argument("--build-threads", type=int, default=1,
                   help="torch threads per build (2 with --jobs 1 on 2 cores: two 1-thread 8,000-step builds "
                        "at once had not finished after 69 min, where a lone one's pace gives ~45)")
    p.add_argument("--threads", type=int, default=2, help="torch threads while measuring")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    wanted = [settings(b) for b in args.bases]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        bases = list(pool.map(build, [args.work] * len(wanted), wanted, [args.build_threads] * len(wanted)))
    torch.set_num_threads(args.threads)
    rows = []
    for s, base in zip(wanted, bases, strict=True):
        info = json.loads((Path(base) / "world_base.json").read_text())
        for k in args.sample_steps:
            acc = measure(base, args.prompts, k, args.seed)
            rows.append({"steps": s.steps, "pool": s.pool, "sample_steps": k, "build_s": info["seconds"],
                         "final_loss": info["final_loss"], "threads": info.get("threads", 1), **acc})
            print(f"{s.steps}:{s.pool} at {k} sample steps: {acc}", flush=True)
    print(f"\n{args.prompts} prompts (seed {args.seed}), guidance {GUIDANCE}; goal >= 0.90 on every attribute\n")
    print("| UNet steps | pool | sample steps | " + " | ".join(COLUMNS) + " | final loss | build |")
    print("|---:|---:|---:|" + "---:|" * len(COLUMNS) + "---:|---|")
    for r in rows:
        cells = " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
        print(f"| {r['steps']} | {r['pool']} | {r['sample_steps']} | {cells} | {r['final_loss']:.4f} | "
              f"{r['build_s']:.0f} s, {r['threads']} thread(s) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
