"""Concept zoo bench: does a generated LoRA start a new editing concept faster than every baseline?

Builds (or reuses, in --work) an edit base, ``--train`` training concepts as a dataset (``edit-lora`` via
``run_batch``), the structured weight generator on it, then for each of ``--heldout`` held-out concepts
(unseen parameter values and unseen compositions) fine-tunes from six starts and records held-out PSNR:

  (a) pix2pix: the base architecture, random init, every weight trained (its final PSNR is the target)
  (b) base + standard LoRA init   (c) the training rows' mean   (d) the nearest training concept by
  condition   (e) (d) plus Gaussian noise (memorisation baseline, Zeng et al. 2025)   (f) generated (1 step)

Steps to target = first evaluation (every ``--eval-every`` steps) whose held-out PSNR reaches the target.
Run: ``.venv/bin/python bench/concept_zoo.py --work /tmp/czoo`` (see docs/BENCHMARKS.md for figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.concepts.base import build_base, load_base, make_base
from weightzoo.tasks.concepts.condition import StructuredCondition
from weightzoo.tasks.concepts.engine import EditFinetuneConfig, train_concepts
from weightzoo.tasks.concepts.pairs import concept_pairs, psnr
from weightzoo.tasks.concepts.zoo import concept_rows, heldout_rows, write_concept_manifest
from weightzoo.tasks.diffusion.generator import (
    WeightDiffusionConfig,
    WeightDiffusionModel,
    train_weight_diffusion,
)
from weightzoo.tasks.finetune.batch import plan_batches, run_batch
from weightzoo.tasks.finetune.manifest import read_manifest

STARTS = ("b_lora_init", "c_mean", "d_nearest", "e_noisy_nearest", "f_generated")


def build(args, work: Path, cfg: EditFinetuneConfig) -> tuple[str, str, list]:
    base = make_base(str(work / "base"), args.base_steps)
    manifest = str(work / "manifest.jsonl")
    if not Path(manifest).exists():
        write_concept_manifest(concept_rows(args.train), manifest)
    dataset = str(work / "dataset")
    t0 = time.perf_counter()
    rows = read_manifest(manifest)
    for plan in plan_batches([r.id for r in rows], 64):
        run_batch(plan.batch_id, plan.ids, manifest, base, dataset, cfg, engine="edit-lora")
    print(f"dataset: {len(Dataset(dataset))} rows, {time.perf_counter() - t0:.0f} s", flush=True)
    return base, dataset, rows


def full_training(pairs, steps: int, eval_every: int, lr: float, batch: int) -> tuple[list[tuple[int, float]], float]:
    """(a): the base architecture from a random init, every weight trained on the concept's pairs."""
    model = build_base(load_base_config, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve, t0 = [], time.perf_counter()
    for step in range(steps + 1):
        if step % eval_every == 0:
            with torch.no_grad():
                curve.append((step, float(psnr(model(pairs.eval_src), pairs.eval_tgt).mean())))
        if step == steps:
            break
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, len(pairs.train_src), (batch,), generator=g)
        loss = F.l1_loss(model(pairs.train_src[idx]), pairs.train_tgt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curve, (time.perf_counter() - t0) / steps


def first_at(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, p in curve if p >= target - 1e-6), None)


def starts(args, dataset: str, wdiff: str, train_rows, held) -> dict[str, list]:
    ds = Dataset(dataset)
    by_id = {}
    for table, w in ds.iter_batches(["id"]):
        for i, rid in enumerate(table.column("id").to_pylist()):
            by_id[rid] = ds.layout.as_tensor(w[i]).float()
    ids = [r.id for r in train_rows if r.id in by_id]
    x = torch.stack([by_id[i] for i in ids])
    cond = StructuredCondition.fit([r.attributes for r in train_rows])
    feats = cond.encode_many([r.attributes for r in train_rows if r.id in by_id])
    model = WeightDiffusionModel.load(wdiff)
    gen = model.generate_attributes([r.attributes for r in held])
    g = torch.Generator().manual_seed(0)
    nearest = [x[int(torch.cdist(cond.encode(r.attributes)[None], feats).argmin())] for r in held]
    noise = x.std(0)
    return {"b_lora_init": [None] * len(held), "c_mean": [x.mean(0)] * len(held), "d_nearest": nearest,
            "e_noisy_nearest": [n + args.noise * noise * torch.randn(n.shape, generator=g) for n in nearest],
            "f_generated": list(gen), "_train": x, "_gen": gen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/czoo")
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--heldout", type=int, default=32)
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--ft-steps", type=int, default=60, help="fine-tune steps of each training concept")
    p.add_argument("--budget", type=int, default=60, help="LoRA steps per held-out start")
    p.add_argument("--full-steps", type=int, default=300, help="steps of (a), the from-scratch baseline")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--diffusion-steps", type=int, default=600)
    p.add_argument("--noise", type=float, default=0.5, help="(e): noise std as a multiple of each parameter's std")
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = EditFinetuneConfig(steps=args.ft_steps, learning_rate=1e-2, pack=32)
    t0 = time.perf_counter()
    base, dataset, train_rows = build(args, work, cfg)
    wdiff = str(work / "wdiff")
    train_weight_diffusion(WeightDiffusionConfig(dataset=dataset, base=base, out=wdiff, condition="structured",
                                                 steps=args.diffusion_steps, block_size=256, width=64, depth=2,
                                                 learning_rate=3e-3, checkpoint_every=args.diffusion_steps))
    print(f"generator: {time.perf_counter() - t0:.0f} s", flush=True)
    held = heldout_rows(args.heldout)
    model = load_base(base)
    global load_base_config
    load_base_config = model.config
    size = model.config.image_size
    pairs = [concept_pairs(r, None, train=cfg.train_pairs, held_out=cfg.eval_pairs, size=size, data_seed=0) for r in held]
    init = starts(args, dataset, wdiff, train_rows, held)
    run_cfg = cfg.model_copy(update={"steps": args.budget, "check_every": args.budget})
    from weightzoo.tasks.concepts.engine import edit_layout

    layout = edit_layout(model, run_cfg)
    curves: dict[str, list] = {}
    secs: dict[str, float] = {}
    for name in STARTS:
        t1 = time.perf_counter()
        runs = train_concepts(model, pairs, run_cfg, layout, init[name], eval_every=args.eval_every)
        secs[name] = (time.perf_counter() - t1) / (len(held) * args.budget)
        curves[name] = [r.psnr for r in runs]
        print(f"{name}: {time.perf_counter() - t1:.0f} s", flush=True)
    full = [full_training(pr, args.full_steps, args.eval_every, 2e-3, cfg.batch_size) for pr in pairs]
    secs["a_pix2pix"] = statistics.mean(s for _, s in full)
    curves["a_pix2pix"] = [c for c, _ in full]
    report(args, held, curves, secs, init, work, time.perf_counter() - t0)


def report(args, held, curves, secs, init, work: Path, total: float) -> None:
    names = ("a_pix2pix", *STARTS)
    table, rows = [], []
    for k, r in enumerate(held):
        target = curves["a_pix2pix"][k][-1][1]
        steps = {n: first_at(curves[n][k], target) for n in names}
        at_equal = {n: dict(curves[n][k]).get(args.budget) for n in names}
        rows.append({"id": r.id, "prompt": r.prompt, "target": target, "steps": steps, "psnr_at_budget": at_equal})
        cells = " | ".join(str(steps[n]) if steps[n] is not None else f">{args.budget if n != 'a_pix2pix' else args.full_steps}"
                           for n in names)
        table.append(f"| {r.prompt} | {target:.1f} | {cells} |")
    x, gen = init["_train"], init["_gen"]
    d_gen = torch.cdist(gen, x).min(1).values
    d_train = torch.cdist(x[:200], x[:200])
    typical = d_train[~torch.eye(len(d_train), dtype=torch.bool)].median()
    summary = {"total_s": total, "seconds_per_step": secs, "gen_to_nearest_train_median": float(d_gen.median()),
               "train_pairwise_median": float(typical), "rows": rows}
    (work / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print("| held-out concept | target dB | " + " | ".join(names) + " |")
    print("\n".join(table))
    for n in names:
        got = [r["steps"][n] for r in rows if r["steps"][n] is not None]
        eq = [r["psnr_at_budget"][n] for r in rows if r["psnr_at_budget"][n] is not None]
        print(f"{n}: reached {len(got)}/{len(rows)}, median steps {statistics.median(got) if got else None}, "
              f"median PSNR at {args.budget} steps {statistics.median(eq) if eq else None}, s/step {secs[n]:.4f}")
    f_vs = {o: sum(1 for r in rows if r["steps"]["f_generated"] is not None and
                   (r["steps"][o] is None or r["steps"]["f_generated"] < r["steps"][o])) for o in STARTS[:-1]}
    print(f"(f) strictly fewer steps than: {f_vs} of {len(rows)}")
    print(f"distance generated→nearest train row (median) {float(d_gen.median()):.3f}; "
          f"typical train-train distance {float(typical):.3f}; total {total:.0f} s")


load_base_config = None

if __name__ == "__main__":
    main()
