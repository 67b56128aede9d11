"""Bench: does a generated LoRA cut fine-tuning steps on a held-out concept? (Gong et al., ECCV 2024 claim 15x.)

1. Build a dataset of real fine-tuned tiny-model LoRAs, one per synthetic subject (``make_subjects``).
2. Train weight diffusion on it, holding out the last ``--holdout`` subjects.
3. For each held-out subject, fine-tune from (a) the standard LoRA init, (m) the training rows' mean,
   (g) the generated weights (one-step); count steps (and seconds) until the loss, as a moving average
   of ``--window`` steps, reaches the level (a) ends at after ``--ft-steps``.
4. Cosine similarity to the true (held-out, fine-tuned) weights, of the update ``w - w_init`` (the raw
   vectors share LoRA's random A init and all have cosine ~1 to each other).

Every row trains on its own seeded stream of images, timesteps and noise, identical for (a), (m) and (g),
so the comparison is paired. (a)'s curve is the dataset row's own training run (the engine trains a
row to the same weights packed or alone).

Starting from given weights: if ``finetune_batch`` accepts ``init_weights`` it is used; otherwise the
start vector's update ``scale·B·A`` is fused into the UNet and a fresh LoRA (standard init, B = 0) is
trained on top. The model then starts at exactly the given weights and the loss curve is the one to
compare, though the trained parameters are the new adapter (a rank-1 correction), not the given one.

The tiny base is random by default. ``--pretrain-steps N`` first trains its UNet for N steps on
captioned synthetic subjects of another population ("a red circle face with a hat on a dark
background"), so the base has features for colour, shape, accessory and background, as SD 1.5 has
for faces in weights2weights. The bench prints how the dataset's per-subject deviations from the mean
relate to the attributes (mean pairwise cosine, same label vs different): with nothing there, no
condition can predict a subject's weights better than the mean.

Run: ``.venv/bin/python bench/weight_diffusion.py [--subjects 24 --holdout 4 --ft-steps 150 ...]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/wz-bench-weight-diffusion", help="Work folder (reused: the dataset resumes).")
    p.add_argument("--subjects", type=int, default=24, help="Synthetic subjects fine-tuned into the dataset.")
    p.add_argument("--holdout", type=int, default=4, help="Subjects held out of diffusion training (the last ones).")
    p.add_argument("--ft-steps", type=int, default=150, help="Fine-tune steps per dataset row (standard init).")
    p.add_argument("--ft-lr", type=float, default=5e-3, help="Fine-tune learning rate (high, so the LoRAs move).")
    p.add_argument("--resolution", type=int, default=32, help="Fine-tune resolution (the tiny base's native is 64).")
    p.add_argument("--ft-batch", type=int, default=1, help="Instance images per row per fine-tune step (less gradient noise).")
    p.add_argument("--pack", type=int, default=8, help="Rows per batched fine-tune step when building the dataset.")
    p.add_argument("--eval-steps", type=int, default=40, help="Fine-tune budget from the (m) and (g) starts.")
    p.add_argument("--window", type=int, default=10, help="Moving-average window of the loss (steps).")
    p.add_argument("--diffusion-steps", type=int, default=1500, help="Weight-diffusion training steps.")
    p.add_argument("--block-size", type=int, default=128, help="Weight-diffusion block size.")
    p.add_argument("--width", type=int, default=64, help="Denoiser width.")
    p.add_argument("--depth", type=int, default=2, help="Denoiser depth.")
    p.add_argument("--lr", type=float, default=1e-2, help="Weight-diffusion learning rate.")
    p.add_argument("--sample-steps", type=int, default=1, help="DDIM steps for the generated start (1 = one step).")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box).")
    p.add_argument("--pretrain-steps", type=int, default=0, help="Train the tiny base's UNet first (0 = random base).")
    p.add_argument("--pretrain-subjects", type=int, default=256, help="Captioned subjects (another seed) to pretrain on.")
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="Pretraining learning rate (AdamW, batch 32).")
    return p.parse_args()


def moving_average(x: list[float], window: int) -> np.ndarray:
    c = np.cumsum(np.insert(np.asarray(x, dtype=np.float64), 0, 0.0))
    return (c[window:] - c[:-window]) / window  # element i = mean of steps i .. i+window-1


def steps_to(history: list[float], target: float, window: int) -> int | None:
    """First step count s (>= window) whose last ``window`` losses average <= target; None if never."""
    ma = moving_average(history, window)
    hit = np.nonzero(ma <= target)[0]
    return int(hit[0]) + window if len(hit) else None


def build_dataset(args: argparse.Namespace, pipe, rows, cfg, dataset: str, base_uri: str) -> dict[str, list[float]]:
    """Fine-tune every subject (standard init) into ``dataset``; returns each row's loss history.

    Histories are kept in ``histories.json`` beside the dataset, so a rerun reuses committed rows.
    """
    from weightzoo.storage.ledger import Ledger
    from weightzoo.storage.shards import RowMeta
    from weightzoo.storage.writer import commit_batch
    from weightzoo.tasks.identity.engine import finetune_batch

    ledger = Ledger(dataset)
    hist_path = Path(dataset) / "histories.json"
    histories = json.loads(hist_path.read_text()) if hist_path.exists() else {}
    todo = ledger.pending([r.id for r in rows])
    by_id = {r.id: r for r in rows}
    for i in range(0, len(todo), args.pack):
        chunk = [by_id[t] for t in todo[i : i + args.pack]]
        t0 = time.perf_counter()
        res = finetune_batch(pipe, chunk, cfg, base_uri=base_uri)
        ok = [r for r in res.results if r.ok]
        metas = [RowMeta(id=r.id, prompt=by_id[r.id].prompt, attributes=by_id[r.id].attributes, hparams=res.hparams,
                         loss=r.loss, steps=r.steps, train_seconds=r.seconds) for r in ok]
        batch = f"bench-{i // args.pack:03d}"
        commit_batch(ledger, batch, res.layout, metas, torch.stack([r.weights for r in ok]))
        for r in ok:
            histories[r.id] = {"loss": r.loss_history, "seconds": r.seconds}
        hist_path.write_text(json.dumps(histories))
        print(f"  fine-tuned {len(ok)}/{len(chunk)} rows in {time.perf_counter() - t0:.0f} s "
              f"({len(histories)}/{len(rows)} done)", flush=True)
    return histories


def caption(attributes: dict[str, str]) -> str:
    acc = {"none": "", "hat": " with a hat", "glasses": " with glasses"}[attributes["accessory"]]
    return f"a {attributes['colour']} {attributes['shape']} face{acc} on a {attributes['background']} background"


def pretrain_base(args: argparse.Namespace, random_base: Path, out: Path) -> None:
    """Train the UNet of the random tiny base on captioned subjects (batch 32, AdamW, ε-prediction); save to ``out``."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    from weightzoo.tasks.identity.base_model import load_base
    from weightzoo.tasks.identity.class_images import encode_images
    from weightzoo.tasks.identity.engine import encode_prompt
    from weightzoo.tasks.identity.synthetic import make_subjects

    pipe = load_base(str(random_base))
    folder = out.parent / f"{out.name}-images"
    rows = make_subjects(str(folder), args.pretrain_subjects, seed=1)  # another population than the dataset's
    caps = [caption(r.attributes) for r in rows for _ in r.images]
    with torch.no_grad():
        latents = encode_images(pipe, [Image.open(folder / p).convert("RGB") for r in rows for p in r.images],
                                args.resolution)
        embeds = {c: encode_prompt(pipe, c) for c in set(caps)}
    cond = torch.cat([embeds[c] for c in caps])
    sched, unet = DDPMScheduler.from_config(pipe.scheduler.config), pipe.unet
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(args.pretrain_steps):
        idx = torch.randint(0, len(latents), (32,), generator=g)
        x = latents[idx]
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (32,), generator=g)
        loss = F.mse_loss(unet(sched.add_noise(x, noise, t), t, encoder_hidden_states=cond[idx]).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"  pretrain step {step + 1}: loss {np.mean(losses[-50:]):.4f}", flush=True)
    unet.eval()
    pipe.save_pretrained(out, safe_serialization=True)


def attribute_structure(ds, rows) -> dict[str, tuple[float, float]]:
    """Per attribute: mean pairwise cosine of rows' deviations from the mean, same label vs different label."""
    from weightzoo.tasks.identity.synthetic import ATTRIBUTES

    ids = [r.id for r in rows]
    w = torch.stack([ds.layout.as_tensor(ds.row(i)[1]).double() for i in ids])
    dev = torch.nn.functional.normalize(w - w.mean(0), dim=1)
    cos = dev @ dev.T
    attrs = [r.attributes for r in rows]
    out = {}
    for name in ATTRIBUTES:
        buckets: dict[bool, list[float]] = {True: [], False: []}  # same label? -> cosines of the pairs
        for i in range(len(ids)):
            for j in range(i):
                buckets[attrs[i][name] == attrs[j][name]].append(float(cos[i, j]))
        out[name] = tuple(float(np.mean(b)) if b else float("nan") for b in (buckets[True], buckets[False]))
    return out


def init_vector(pipe, cfg, layout, row_id: str) -> torch.Tensor:
    """The standard LoRA init of a row (the engine's A init, B = 0), flattened with ``layout``."""
    from weightzoo.tasks.finetune.packed_lora import find_targets
    from weightzoo.tasks.identity.engine import METHODS

    sd = {}
    for name in find_targets(pipe.unet, cfg.target_modules):
        layer = pipe.unet.get_submodule(name)
        sd[f"{name}.lora_A.weight"] = METHODS[cfg.method].init_a(name, layer, [row_id], cfg)[0]
        sd[f"{name}.lora_B.weight"] = torch.zeros(layer.out_features, cfg.rank)
    return layout.flatten(sd).float()


def finetune_from(pipe, row, cfg, layout, hparams: dict, start: torch.Tensor, base_uri: str):
    """Fine-tune ``row`` starting at weights ``start`` (see the module docstring for the fallback)."""
    from weightzoo.tasks.finetune.export import lora_state_dict
    from weightzoo.tasks.identity.engine import finetune_batch

    if "init_weights" in inspect.signature(finetune_batch).parameters:
        return finetune_batch(pipe, [row], cfg, base_uri=base_uri, init_weights={row.id: layout.as_tensor(start)}).results[0]
    sd = lora_state_dict(layout.as_tensor(start), layout, hparams)  # scale baked into B
    saved = {}
    with torch.no_grad():
        for key, a in sd.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix("unet.").removesuffix(".lora_A.weight")
            lin = pipe.unet.get_submodule(module)
            saved[module] = lin.weight.detach().clone()
            lin.weight += sd[key.replace("lora_A", "lora_B")].float() @ a.float()
    try:
        return finetune_batch(pipe, [row], cfg, base_uri=base_uri).results[0]
    finally:
        with torch.no_grad():
            for module, w in saved.items():
                pipe.unet.get_submodule(module).weight.copy_(w)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from weightzoo.storage.dataset import Dataset
    from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
    from weightzoo.tasks.diffusion.generator import WeightDiffusionModel, train_weight_diffusion
    from weightzoo.tasks.identity.base_model import load_base, save_tiny_pipeline
    from weightzoo.tasks.identity.config import FinetuneConfig
    from weightzoo.tasks.identity.synthetic import make_subjects

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not (base / "model_index.json").exists():
        save_tiny_pipeline(base)
    if args.pretrain_steps:
        trained_base = work / f"base-pretrained-{args.pretrain_steps}-r{args.resolution}"
        if not (trained_base / "model_index.json").exists():
            t0 = time.perf_counter()
            pretrain_base(args, base, trained_base)
            print(f"pretrained the base in {time.perf_counter() - t0:.0f} s", flush=True)
        base = trained_base
    pipe = load_base(str(base))
    subjects = work / "subjects"
    # class_prompt = prompt: without prior preservation it is unused (the engine still looks it up).
    rows = [r.model_copy(update={"class_prompt": r.prompt}) for r in make_subjects(str(subjects), args.subjects)]
    cfg = FinetuneConfig(steps=args.ft_steps, learning_rate=args.ft_lr, prior_preservation=False, pack=args.pack,
                         resolution=args.resolution, lr_warmup_steps=10, seed=0, images_per_step=args.ft_batch)
    batch = "" if args.ft_batch == 1 else f"-b{args.ft_batch}"
    pre = f"-pre{args.pretrain_steps}" if args.pretrain_steps else ""
    dataset = str(work / f"dataset-{args.subjects}x{args.ft_steps}-lr{args.ft_lr:g}-r{args.resolution}{batch}{pre}")
    t0 = time.perf_counter()
    histories = build_dataset(args, pipe, rows, cfg, dataset, str(subjects))
    t_data = time.perf_counter() - t0
    holdout = [r.id for r in rows[-args.holdout :]]

    model_dir = work / f"wd-{Path(dataset).name}-{args.diffusion_steps}"
    wcfg = WeightDiffusionConfig(dataset=dataset, base=str(base), out=str(model_dir), holdout_ids=tuple(holdout),
                                 steps=args.diffusion_steps, block_size=args.block_size, width=args.width,
                                 depth=args.depth, learning_rate=args.lr, lr_warmup_steps=50, batch_size=32, device="cpu",
                                 checkpoint_every=max(args.diffusion_steps, 1))
    t0 = time.perf_counter()
    trained = train_weight_diffusion(wcfg)
    t_diff = time.perf_counter() - t0
    model = WeightDiffusionModel.load(str(model_dir))
    ds = Dataset(dataset)
    structure = attribute_structure(ds, rows)
    print("mean pairwise cosine of per-subject deviations, same label / different label: " +
          ", ".join(f"{k} {a:.3f} / {b:.3f}" for k, (a, b) in structure.items()), flush=True)
    layout, hparams = ds.layout, model.hparams
    eval_cfg = cfg.model_copy(update={"steps": args.eval_steps, "pack": 1})
    by_id = {r.id: r for r in rows}
    out_rows = []
    t0 = time.perf_counter()
    for sid in holdout:
        meta, true = ds.row(sid)
        true_v = layout.as_tensor(true).float()
        w0 = init_vector(pipe, cfg, layout, sid)
        gen = model.generate([model.text(meta["prompt"], meta["attributes"])], steps=args.sample_steps)[0]
        gen10 = model.generate([model.text(meta["prompt"], meta["attributes"])], steps=10)[0]
        mean = model.stats.mean
        hist_a = histories[sid]["loss"]
        target = float(np.mean(hist_a[-args.window :]))
        rec = {"id": sid, "target": target, "steps_a": steps_to(hist_a, target, args.window),
               "sec_per_step_a": histories[sid]["seconds"] / args.ft_steps,
               "cos_gen": cosine(gen - w0, true_v - w0), "cos_gen10": cosine(gen10 - w0, true_v - w0),
               "cos_mean": cosine(mean - w0, true_v - w0),
               # does the condition add anything beyond the mean? direction of (generated - mean) vs (true - mean)
               "cos_resid": cosine(gen - mean, true_v - mean),
               "err_gen": float((gen - true_v).norm() / (true_v - w0).norm()),
               "err_mean": float((mean - true_v).norm() / (true_v - w0).norm())}
        for name, start in (("mean", mean), ("gen", gen)):
            res = finetune_from(pipe, by_id[sid], eval_cfg, layout, hparams, start, str(subjects))
            rec[f"steps_{name}"] = steps_to(res.loss_history, target, args.window)
            rec[f"sec_per_step_{name}"] = res.seconds / args.eval_steps
            rec[f"first_{name}"] = float(np.mean(res.loss_history[: args.window]))
        rec["first_a"] = float(np.mean(hist_a[: args.window]))
        out_rows.append(rec)
        print(json.dumps(rec), flush=True)
    t_eval = time.perf_counter() - t0

    def fmt(s: int | None) -> str:
        return f">{args.eval_steps}" if s is None else str(s)

    print("\n| subject | target loss | steps (a) init | steps (m) mean | steps (g) generated | ratio a/g | "
          "cos(g) | cos(m) | rel. err g / m |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for r in out_rows:
        ratio = r["steps_a"] / r["steps_gen"] if r["steps_gen"] else None
        if ratio is not None:
            ratios.append(ratio)
        print(f"| {r['id']} | {r['target']:.4f} | {r['steps_a']} | {fmt(r['steps_mean'])} | {fmt(r['steps_gen'])} | "
              f"{'n/a' if ratio is None else f'{ratio:.1f}x'} | {r['cos_gen']:.3f} | {r['cos_mean']:.3f} | "
              f"{r['err_gen']:.3f} / {r['err_mean']:.3f} |")
    summary = {
        "args": vars(args), "diffusion": {"step": trained.step, "loss": trained.loss}, "structure": structure,
        "seconds": {"dataset": t_data, "diffusion": t_diff, "eval": t_eval},
        "median_ratio_a_over_g": statistics.median(ratios) if ratios else None,
        "reached_g": sum(r["steps_gen"] is not None for r in out_rows),
        "reached_m": sum(r["steps_mean"] is not None for r in out_rows),
        "mean_cos_gen": statistics.fmean(r["cos_gen"] for r in out_rows),
        "mean_cos_gen10": statistics.fmean(r["cos_gen10"] for r in out_rows),
        "mean_cos_mean": statistics.fmean(r["cos_mean"] for r in out_rows),
        "mean_cos_resid": statistics.fmean(r["cos_resid"] for r in out_rows),
        "rows": out_rows,
    }
    (work / "result.json").write_text(json.dumps(summary, indent=1))
    print(f"\nmedian steps ratio (a)/(g): {summary['median_ratio_a_over_g']}; reached target within "
          f"{args.eval_steps} steps: generated {summary['reached_g']}/{len(out_rows)}, mean {summary['reached_m']}/{len(out_rows)}")
    print(f"cosine of update to true: generated {summary['mean_cos_gen']:.3f} (10-step DDIM {summary['mean_cos_gen10']:.3f}), "
          f"mean {summary['mean_cos_mean']:.3f}; cos(generated - mean, true - mean) {summary['mean_cos_resid']:.3f}")
    print(f"time: dataset {t_data:.0f} s, weight diffusion {t_diff:.0f} s, held-out fine-tunes {t_eval:.0f} s")


if __name__ == "__main__":
    main()
