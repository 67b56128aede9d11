"""Identity world bench: do weights2weights' claims hold on LoRAs of a base that draws something you can read?

Builds (or reuses, under --work) the world base (tasks/world/base.py), ``--identities`` training identities
plus ``--heldout`` held-out ones as DreamBooth-LoRA rows (``run_batch``, the diffusers-lora engine), fits a
subspace on the training rows, and measures with the pixel reader (tasks/world/render.py ``read``):

- sample: share of models sampled from the subspace whose pictures hold a readable subject, and how far each
  is from its nearest training row (weight space) against training rows' own nearest-neighbour distance;
- edit: for each attribute, ``--edit-ids`` training identities moved towards another label along the direction
  ``weightzoo edit`` takes (the cross-validated ridge probe, every other attribute projected out), at each of
  ``--strengths`` std: share of pictures that read the new label, and share of the other attributes kept; the
  same for a random unit direction (``--plot`` draws the trade-off);
- invert: from one image of each held-out identity, the inverted model's reader agreement with its labels,
  against the training identity whose first image is nearest in pixels, and against the mean model;
- projection: share of each held-out row's standardised norm² the subspace captures at k = 8, 32, 128;
- generate: weight generators (``GENERATORS``) trained on the training rows and asked for ``--gen-combos``
  attribute combinations no training identity has; agreement of their LoRAs' pictures with the request.

``--json FILE`` writes the claims (``sample_valid``, ``edit_accuracy``, ``edit_random_accuracy``,
``edit_preservation``, ``edit_random_preservation``, ``invert``, ``invert_nearest``, ``invert_mean``,
``ceiling``, ``generate_agreement``, at ``--strength``) as one object, so any seed is checked the same way;
``--parts`` measures some claims only and keeps the others an earlier run of that seed wrote.
``--seed`` draws identities and pictures; the base stays the shipped one (``--base-seed``).
Base, dataset, subspace and generators live in folders named by their settings, so reruns reuse them.
Run: ``.venv/bin/python bench/identity_world.py --identities 16`` (tiny) or the defaults (256 identities).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.finetune.batch import plan_batches, run_batch
from weightzoo.tasks.finetune.images import load_images
from weightzoo.tasks.finetune.readers import read_manifest
from weightzoo.tasks.identity.base_model import load_base
from weightzoo.tasks.subspace.config import default_strength
from weightzoo.tasks.subspace.pca import SubspaceConfig, fit_subspace, load_subspace
from weightzoo.tasks.subspace.w2w import (
    attribute_directions,
    edit,
    edit_direction,
    edit_to_label,
    invert,
    label_shift,
    sample,
    subspace_hparams,
)
from weightzoo.tasks.world.base import build_world_base
from weightzoo.tasks.world.config import WORLD_FINETUNE, WorldBaseSettings
from weightzoo.tasks.world.identities import (
    PROMPT,
    generate,
    lora_loaded,
    world_finetune_config,
    write_world_manifest,
)
from weightzoo.tasks.world.render import ATTRIBUTES, agreement, is_valid, read

KS = (8, 32, 128)


def build(args) -> tuple[Path, str, str, list]:
    """Base, manifest, training and held-out datasets (kept and reused) and the manifest rows."""
    base = build_world_base(Path(args.work) / "bases", args.base_seed, args.base_steps, args.vae_steps, args.pool)
    cfg = world_finetune_config(steps=args.ft_steps, learning_rate=args.ft_lr, pack=8, prior_preservation=args.prior)
    data = Path(args.work) / (f"{base.name}-draw{args.seed}-n{args.identities}-h{args.heldout}-img{args.images}-ft{args.ft_steps}-{args.ft_lr}"
                              + ("" if args.prior else "-noprior"))
    manifest = data / "manifest.jsonl"
    if not manifest.exists():
        write_world_manifest(str(data), args.identities + args.heldout, args.images, args.seed)
    rows = read_manifest(str(manifest))
    t0 = time.perf_counter()
    for name, part in (("train", rows[: args.identities]), ("heldout", rows[args.identities :])):
        for plan in plan_batches([r.id for r in part], 32):
            run_batch(plan.batch_id, plan.ids, str(manifest), str(base), str(data / name), cfg,
                      cache_dir=str(data / "cache"))
    print(f"datasets: {time.perf_counter() - t0:.0f} s", flush=True)
    return base, str(data / "train"), str(data / "heldout"), rows


def reads(pipe, weights, layout, hparams, n: int, seed: int) -> list[dict[str, str]]:
    """The reader's labels of ``n`` pictures of the identity prompt from one model (``None``: the base)."""
    with lora_loaded(pipe, weights, layout, hparams):
        return [read(im) for im in generate(pipe, PROMPT, n, seed)]


def bench_sample(sub, pipe, hparams, args) -> dict[str, float]:
    ws, _ = sample(sub, args.samples, seed=args.seed)
    ds = Dataset(sub.dataset)
    train = torch.from_numpy(np.stack([ds.row(i)[1] for i in ds.ids]).astype(np.float32))
    valid = []
    for w in ws:
        with lora_loaded(pipe, w, sub.layout, hparams):
            valid += [is_valid(im) for im in generate(pipe, PROMPT, args.pictures, args.seed)]
    d_train = torch.cdist(train, train).fill_diagonal_(float("inf")).min(1).values
    d_sample = torch.cdist(ws, train).min(1).values
    return {"valid": float(np.mean(valid)), "nn_dist_sample": float(d_sample.median()),
            "nn_dist_train": float(d_train.median())}


def _target(sub, attr: str, current: str) -> str:
    """The next label after ``current`` that the rows carry."""
    present = sorted(attribute_directions(sub, attr))
    values = [v for v in ATTRIBUTES[attr] if v in present]
    return values[(values.index(current) + 1) % len(values)]


def _edits(sub, w, attr: str, current: str, target: str, strength: float, r: torch.Tensor, direction: str) -> dict:
    """The model edited as ``weightzoo edit --direction`` does, and moved as far along the random unit ``r``.

    labels: ``strength`` times the labels' average difference (``label_shift``), random of the same length;
    probe: ``strength`` dataset std along the probe's unit direction (``edit_direction``) and along ``r``."""
    if direction == "labels":
        shift = label_shift(sub, attr, target, current)
        return {"w2w": edit_to_label(sub, w, shift, strength), "random": edit_to_label(sub, w, r * shift.norm(), strength)}
    return {"w2w": edit(sub, w, edit_direction(sub, attr, target), strength), "random": edit(sub, w, r, strength)}


def bench_ceiling(sub, pipe, hparams, args) -> dict[str, float]:
    """How well the edited identities' own models draw their labels: the ceiling of every claim."""
    ds = Dataset(sub.dataset)
    got = []
    for item in ds.ids[: args.edit_ids]:
        meta, w = ds.row(item)
        got += [agreement(g_, dict(meta["attributes"])) for g_ in reads(pipe, w, sub.layout, hparams, args.pictures, args.seed)]
    return {"unedited": float(np.mean(got))}


def bench_edit(sub, pipe, hparams, args) -> dict[str, float]:
    """Edit accuracy and preservation at each of ``args.strengths``: ``args.direction``'s edit and a random one."""
    ds = Dataset(sub.dataset)
    ids = ds.ids[: args.edit_ids]
    g = torch.Generator().manual_seed(args.seed)
    out: dict[str, list[float]] = {}
    for attr in ATTRIBUTES:
        for item in ids:
            meta, w = ds.row(item)
            labels = dict(meta["attributes"])
            target = _target(sub, attr, labels[attr])
            r = torch.randn(sub.k, generator=g)
            for strength in args.strengths:
                edits = _edits(sub, w, attr, labels[attr], target, strength, r / r.norm(), args.direction)
                for name, edited in edits.items():
                    got = reads(pipe, edited, sub.layout, hparams, args.pictures, args.seed)
                    out.setdefault(f"{name}_acc@{strength:g}", []).extend(g_[attr] == target for g_ in got)
                    out.setdefault(f"{name}_keep@{strength:g}", []).extend(
                        agreement(g_, {a: v for a, v in labels.items() if a != attr}) for g_ in got)
    return {k: float(np.mean(v)) for k, v in out.items()}


def strength_plot(edit: dict[str, float], strengths: list[float], path: str, direction: str = "labels") -> None:
    """Edit accuracy and preservation against strength, w2w against random: users tune strength on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, style in (("w2w", "-"), ("random", ":")):
        ax.plot(strengths, [edit[f"{name}_acc@{s:g}"] for s in strengths], "o" + style, color="C0", label=f"{name} accuracy")
        ax.plot(strengths, [edit[f"{name}_keep@{s:g}"] for s in strengths], "s" + style, color="C1",
                label=f"{name} preservation")
    ax.set_xlabel("edit strength (" + ("times the labels' average difference" if direction == "labels"
                                      else "dataset std along the direction") + ")")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bench_invert(sub, pipe, hparams, args, heldout: list, manifest_dir: str) -> dict[str, float]:
    ds = Dataset(sub.dataset)
    train_ids = ds.ids
    rows = {r.id: r for r in read_manifest(str(Path(manifest_dir) / "manifest.jsonl"))}
    firsts = np.stack([np.asarray(load_images(rows[i], manifest_dir)[0], np.float32) for i in train_ids])
    out: dict[str, list[float]] = {"inverted": [], "nearest": [], "mean": []}
    for row in heldout:
        image = load_images(row, manifest_dir)[0]
        inv = invert(sub, pipe, image, PROMPT, steps=args.invert_steps, seed=args.seed, hparams=hparams)
        near = train_ids[int(((firsts - np.asarray(image, np.float32)) ** 2).sum((1, 2, 3)).argmin())]
        labels = dict(row.attributes)
        for name, w in (("inverted", inv.weights), ("nearest", ds.row(near)[1]), ("mean", sub.mean)):
            out[name] += [agreement(g_, labels) for g_ in reads(pipe, w, sub.layout, hparams, args.pictures, args.seed)]
    return {k: float(np.mean(v)) for k, v in out.items()}


# The generators compared: the text condition the identity pipeline used to default to, the attributes as
# one-hots (StructuredCondition), and each plus the residual on the 4 nearest rows (the edit workload's).
GENERATORS = {"text": {"condition": "prompt+attributes"}, "text+knn4": {"condition": "prompt+attributes", "residual_k": 4},
              "structured": {"condition": "structured"}, "structured+knn4": {"condition": "structured", "residual_k": 4}}


def unseen_combinations(train_attrs: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """Up to ``n`` attribute combinations no training identity has (a seeded draw of all of them)."""
    import itertools

    seen = {tuple(a[k] for k in ATTRIBUTES) for a in train_attrs}
    combos = [dict(zip(ATTRIBUTES, c, strict=True)) for c in itertools.product(*ATTRIBUTES.values()) if c not in seen]
    random.Random(seed).shuffle(combos)
    return combos[:n]


def bench_generate(train_uri: str, base: Path, pipe, hparams, args) -> dict[str, float]:
    """Each generator of ``GENERATORS`` trained on the training rows, asked for attribute combinations no
    training identity has: the reader's agreement with the requested attributes (``generate_agreement`` is the
    best), and how far generations for different combinations are apart against one combination's two seeds."""
    from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
    from weightzoo.tasks.diffusion.generator import WeightDiffusionModel, train_weight_diffusion

    ds = Dataset(train_uri)
    attrs = [dict(a or []) for a in ds.metadata(["attributes"]).column("attributes").to_pylist()]
    combos = unseen_combinations(attrs, args.gen_combos, args.seed)
    out: dict[str, float] = {"combinations": float(len(combos))}
    for name, fields in GENERATORS.items():
        folder = f"{train_uri}-wdiff-{name}-s{args.gen_steps}"
        train_weight_diffusion(WeightDiffusionConfig(dataset=train_uri, base=str(base), out=folder,
                                                     steps=args.gen_steps, device="cpu", **fields))
        model = WeightDiffusionModel.load(folder)
        texts = [model.text(PROMPT, c) for c in combos]
        rows = model.generate(texts, seed=args.seed)
        again = model.generate(texts, seed=args.seed + 1)
        out[f"{name}_agreement"] = float(np.mean([agreement(g_, c) for w, c in zip(rows, combos, strict=True)
                                                  for g_ in reads(pipe, w, model.layout, hparams, args.pictures, args.seed)]))
        between = torch.cdist(rows, rows)[~torch.eye(len(rows), dtype=torch.bool)].mean()
        out[f"{name}_between/within"] = float(between / (rows - again).norm(dim=1).mean().clamp_min(1e-12))
    out["generate_agreement"] = max(out[f"{name}_agreement"] for name in GENERATORS)
    return out


def bench_projection(sub, heldout_uri: str) -> dict[str, float]:
    ds = Dataset(heldout_uri)
    z = torch.stack([(torch.from_numpy(ds.row(i)[1].astype(np.float32)) - sub.mean) / sub.std for i in ds.ids])
    out = {}
    for k in sorted({k for k in KS if k <= sub.k} | {sub.k}):
        c = z @ sub.components[:k].T
        out[f"captured@{k}"] = float((c.square().sum(1) / z.square().sum(1)).mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/identity_world")
    p.add_argument("--identities", type=int, default=256)
    p.add_argument("--heldout", type=int, default=None, help="held-out identities (default: identities / 16, at least 2)")
    p.add_argument("--images", type=int, default=4, help="training images per identity")
    p.add_argument("--seed", type=int, default=0, help="the draw: identities, samples, edits, pictures")
    p.add_argument("--base-seed", type=int, default=WorldBaseSettings.seed,
                   help="the world base's seed (default: the shipped base's, so any draw tests what users get)")
    p.add_argument("--base-steps", type=int, default=WorldBaseSettings.steps)
    p.add_argument("--vae-steps", type=int, default=WorldBaseSettings.vae_steps)
    p.add_argument("--pool", type=int, default=WorldBaseSettings.pool)
    p.add_argument("--ft-steps", type=int, default=WORLD_FINETUNE["steps"])
    p.add_argument("--ft-lr", type=float, default=WORLD_FINETUNE["learning_rate"])
    p.add_argument("--prior", action=argparse.BooleanOptionalAction, default=WORLD_FINETUNE["prior_preservation"],
                   help="LoRAs with prior preservation (with the default steps and rate: runs 2-4's recipe; the world "
                        "recipe has none since run 5)")
    p.add_argument("--components", type=int, default=128, help="k of the fitted subspace (capped at identities - 1)")
    p.add_argument("--samples", type=int, default=32, help="models sampled from the subspace")
    p.add_argument("--pictures", type=int, default=2, help="pictures generated per model")
    p.add_argument("--edit-ids", type=int, default=8, help="training identities edited per attribute")
    p.add_argument("--direction", choices=["labels", "probe"], default="labels",
                   help="the edit measured (weightzoo edit --direction): labels (the default) or probe (runs 3-5's)")
    p.add_argument("--strength", type=float, default=None,
                   help="edit strength reported in --json (default: weightzoo edit's, 1.5 for labels, 4 for probe)")
    p.add_argument("--strengths", type=float, nargs="+", default=None,
                   help="strengths measured for the trade-off (default: 0.5 1 1.5 2 3 for labels, 1 2 3 4 6 for "
                        "probe, and --strength)")
    p.add_argument("--json", help="write the claims as one JSON object to this file")
    p.add_argument("--plot", help="write the accuracy/preservation-against-strength plot (PNG) to this file")
    p.add_argument("--invert-steps", type=int, default=100)
    p.add_argument("--parts", nargs="+", default=["sample", "edit", "invert", "projection", "generate"],
                   choices=["sample", "edit", "invert", "projection", "generate"],
                   help="claims measured (the ceiling always); --json keeps an earlier run's other claims")
    p.add_argument("--gen-steps", type=int, default=2000, help="training steps of each weight generator")
    p.add_argument("--gen-combos", type=int, default=16, help="unseen attribute combinations asked of the generators")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.heldout = args.heldout or max(2, args.identities // 16)
    args.strength = default_strength(args.direction) if args.strength is None else args.strength
    default = [0.5, 1.0, 1.5, 2.0, 3.0] if args.direction == "labels" else [1.0, 2.0, 3.0, 4.0, 6.0]
    args.strengths = sorted(set(args.strengths or default) | {args.strength})
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # one "no text-encoder LoRA keys" line per loaded model otherwise
    random.seed(args.seed)
    t0 = time.perf_counter()
    base, train_uri, heldout_uri, rows = build(args)
    k = min(args.components, args.identities - 1)
    sub_uri = f"{train_uri}-subspace-k{k}"
    if not Path(sub_uri, "card.json").exists():
        fit_subspace(train_uri, sub_uri, SubspaceConfig(components=k, device="cpu"))
    sub, pipe = load_subspace(sub_uri), load_base(str(base))
    hparams = subspace_hparams(sub)
    heldout = rows[args.identities :]
    parts = {"ceiling": lambda: bench_ceiling(sub, pipe, hparams, args),
             "sample": lambda: bench_sample(sub, pipe, hparams, args), "edit": lambda: bench_edit(sub, pipe, hparams, args),
             "invert": lambda: bench_invert(sub, pipe, hparams, args, heldout, str(Path(train_uri).parent)),
             "projection": lambda: bench_projection(sub, heldout_uri),
             "generate": lambda: bench_generate(train_uri, base, pipe, hparams, args)}
    table = {name: run() for name, run in parts.items() if name == "ceiling" or name in args.parts}
    print(f"\nidentity world: {args.identities} identities, {args.heldout} held out, k={k}, "
          f"{time.perf_counter() - t0:.0f} s")
    for claim, figures in table.items():
        print(f"{claim:11s} " + "  ".join(f"{name}={value:.3f}" for name, value in figures.items()))
    claims = {"ceiling": table["ceiling"]["unedited"], "seed": args.seed, "identities": args.identities}
    if "sample" in table:
        claims["sample_valid"] = table["sample"]["valid"]
    if "edit" in table:
        e, st = table["edit"], f"{args.strength:g}"
        claims |= {"edit_accuracy": e[f"w2w_acc@{st}"], "edit_random_accuracy": e[f"random_acc@{st}"],
                   "edit_preservation": e[f"w2w_keep@{st}"], "edit_random_preservation": e[f"random_keep@{st}"],
                   "strength": args.strength, "direction": args.direction,
                   "by_strength": {f"{s:g}": {k: e[f"{k}@{s:g}"] for k in ("w2w_acc", "w2w_keep", "random_acc",
                                                                           "random_keep")} for s in args.strengths}}
    if "invert" in table:
        inv = table["invert"]
        claims |= {"invert": inv["inverted"], "invert_nearest": inv["nearest"], "invert_mean": inv["mean"]}
    if "generate" in table:
        claims |= {"generate_agreement": table["generate"]["generate_agreement"], "generate": table["generate"]}
    if args.json:  # a run of some --parts updates the claims an earlier run wrote
        old = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
        keep = old if (old.get("seed"), old.get("identities")) == (args.seed, args.identities) else {}
        Path(args.json).write_text(json.dumps(keep | claims, indent=2) + "\n")
    if args.plot and "edit" in table:
        strength_plot(table["edit"], args.strengths, args.plot, args.direction)


if __name__ == "__main__":
    main()
