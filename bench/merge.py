"""Merging N independently trained concepts: Orthogonal Adaptation versus plain LoRA, same rows, same steps.

Each concept (a synthetic subject with its own token, "<tok> person") is fine-tuned alone (one pack,
which trains every row exactly as alone), then all are summed into one LoRA (``export.merged_state_dict``,
what ``weightzoo merge`` writes). Each concept's denoising loss on its own images is measured on fixed
draws under the base, its single model and the merge (``bench/interference.py``); "kept" is the share
of the single model's improvement over the base that survives the merge (1 = merging costs nothing).
No assertions: a benchmark reports; ``tests/test_recipes.py`` asserts the margin.
Run: ``.venv/bin/python bench/merge.py [--concepts 4 --steps 30 --lr 1e-3]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

TOKENS = ["qzv", "xjk", "wvb", "kqz", "pfy", "gdj", "vmx", "zbh"]


def main() -> None:
    """Train the concepts with each method, merge, print one table row per method."""
    from interference import mean_kept, train_and_merge  # beside this script

    from weightzoo.tasks.identity.base_model import build_tiny_pipeline
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.synthetic import make_subjects

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=4, choices=range(2, len(TOKENS) + 1), metavar="N")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--draws", type=int, default=32, help="fixed (timestep, noise) draws per concept")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    root = tempfile.mkdtemp(prefix="wz-merge-")
    subjects = make_subjects(root, args.concepts, images_per_subject=3, size=32)
    rows = [r.model_copy(update={"prompt": f"{t} person"}) for r, t in zip(subjects, TOKENS, strict=False)]
    print(f"# {args.concepts} concepts x {args.steps} steps, lr {args.lr}, tiny UNet at 32 px, rank 1 to_q/to_v, "
          f"{args.draws} draws per concept, {os.cpu_count()} CPUs")
    print("\n| method | base loss | single loss | merged loss | kept (mean) | kept (min) | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method in ("orthogonal", "lora"):
        cfg = FinetuneConfig(method=method, steps=args.steps, learning_rate=args.lr, resolution=32,
                             prior_preservation=False, pack=args.concepts, weights_dtype="float32")
        start = time.perf_counter()
        report = train_and_merge(pipe, rows, cfg, root, None, args.draws)
        secs = time.perf_counter() - start
        mean = {k: sum(float(r[k]) for r in report) / len(report) for k in ("base", "single", "merged")}
        print(f"| {method} | {mean['base']:.4f} | {mean['single']:.4f} | {mean['merged']:.4f} | "
              f"{mean_kept(report):.2f} | {min(float(r['kept']) for r in report):.2f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
