"""Concept zoo bench: does a generated LoRA start a new editing concept faster than every baseline?

Builds (or reuses, in --work) an edit base, ``--train`` training concepts as a dataset (``edit-lora`` via
``run_batch``), the structured weight generator on it, then for each of ``--heldout`` held-out concepts
(unseen parameter values and unseen compositions) fine-tunes from eight starts and records held-out PSNR:

  (a) pix2pix: the base architecture, random init, every weight trained (its final PSNR is the target)
  (b) base + standard LoRA init   (c) the training rows' mean   (d) the nearest training concept by
  condition   (e) (d) plus Gaussian noise (memorisation baseline, Zeng et al. 2025)   (f) generated (1 step)
  (g) the ``--knn`` nearest rows, inverse-distance weighted (the residual generator's retrieval, same code)
  (h) the family soup: the mean of the training rows of the concept's family; a composition takes the rows
      of the same two families in either order (held-out compositions never occur in their own order),
      else the mean of its parts' soups
  (d_svd) (d) in the SVD form (tasks/finetune/gauge.py: the same edit ΔW, canonical factors B = U·√S, A = √S·Vᵀ)
  (g_svd) the mean *edit* of (g)'s rows with (g)'s weights (their ΔW averaged, truncated to rank r by SVD)
  (*_rg) with ``--gauge-scale S ...``: (c) as the mean edit of every row, (d), (f) and (g)'s mean edit, each
      in the recipe's gauge (``svd_form(..., norms)``: same ΔW, A rows orthogonal with S x the training rows'
      median A norm), named ``<start>_rg`` for S = 1, ``<start>_rg<S>`` otherwise

``--also KEY=VALUE[,KEY=VALUE] ...`` trains more generators (the main one with those changes: the first-order
``inner_steps``, the SVD ``form``, ...) and scores each as one more start, ``f:<changes>``, beside the same
baselines in the same run; the goals are checked for every generator start.

``--seed`` draws another held-out set (0 is the documented one): the training concepts and their banned
compositions stay those of seed 0, so the base, dataset and generator folders are reused; the draw is
checked disjoint from the training concepts. The generator defaults to the edit workload's (flows/config.py):
residual on ``--residual-k`` 4 nearest rows, ``--objective task`` (``--residual-k 0 --objective weights`` is
the plain generator of the first tables); ``--starts`` scores only the named starts ((a), the target, always
runs); ``--method`` is the dataset's ``EditFinetuneConfig.method``; each
configuration writes its own ``results-<config>.json``.

Steps to target = first evaluation (every ``--eval-every`` steps) whose held-out PSNR reaches the target;
time to target = steps x seconds per step of one concept trained alone (measured here for LoRA and full
training), plus the time to generate one LoRA for (f). Base, manifest, dataset and generator go to folders
named by their settings under ``--work``, so a rerun with other start or generator settings reuses them.
Run: ``.venv/bin/python bench/concept_zoo.py --work /tmp/czoo`` (see docs/BENCHMARKS.md for figures).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.concepts.base import build_base, load_base, make_base
from weightzoo.tasks.concepts.condition import StructuredCondition
from weightzoo.tasks.concepts.config import EditFinetuneConfig
from weightzoo.tasks.concepts.edits import COMPOSE
from weightzoo.tasks.concepts.engine import edit_layout, train_concepts
from weightzoo.tasks.concepts.pairs import concept_pairs, psnr
from weightzoo.tasks.concepts.zoo import concept_rows, heldout_rows, write_concept_manifest
from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
from weightzoo.tasks.diffusion.generator import WeightDiffusionModel, train_weight_diffusion
from weightzoo.tasks.diffusion.retrieval import interpolate, knn_weights
from weightzoo.tasks.finetune.batch import plan_batches, run_batch
from weightzoo.tasks.finetune.gauge import a_norms, mean_edit, svd_form
from weightzoo.tasks.finetune.readers import read_manifest

GENERATED = "f_generated"
STARTS = ("b_lora_init", "c_mean", "d_nearest", "e_noisy_nearest", GENERATED, "g_knn", "h_family_soup",
          "d_nearest_svd", "g_knn_svd")
# what --also may change of the generator (each KEY=VALUE,... is one more generator, one more start)
ALSO = ("residual_k", "objective", "task_weight", "task_pairs", "inner_steps", "inner_lr", "form", "diffusion_steps")
DEFAULT_METHOD = "edit-lora"
# The goals: (f) strictly fewer steps than each of these on >= 75 % of the concepts any LoRA start
# reaches; median time to target >= 4.6x faster than (b) (DNW over E2GAN) and >= 15x faster than (a).
BEAT = ("c_mean", "d_nearest", "e_noisy_nearest", "g_knn", "h_family_soup")
GOAL_SHARE, GOAL_B, GOAL_A = 0.75, 4.6, 15.0


def build(args, work: Path, cfg: EditFinetuneConfig) -> tuple[str, str, list]:
    """The base, manifest and dataset, each in a folder named by its settings (kept and reused)."""
    base = make_base(str(work / f"base-{args.base_steps}"), args.base_steps)
    manifest = str(work / f"manifest-{args.train}.jsonl")
    if not Path(manifest).exists():
        write_concept_manifest(concept_rows(args.train), manifest)
    method = "" if cfg.method == DEFAULT_METHOD else f"-{cfg.method}"  # today's folders keep their names
    dataset = str(work / f"dataset-{args.train}-{args.base_steps}-{cfg.steps}-{cfg.learning_rate}-{cfg.rank}-{cfg.adam_epsilon}{method}")
    t0 = time.perf_counter()
    rows = read_manifest(manifest)
    for plan in plan_batches([r.id for r in rows], 64):
        run_batch(plan.batch_id, plan.ids, manifest, base, dataset, cfg, engine="edit-lora")
    print(f"dataset: {len(Dataset(dataset))} rows, {time.perf_counter() - t0:.0f} s", flush=True)
    return base, dataset, rows


def full_training(config, pairs, steps: int, eval_every: int, lr: float, batch: int) -> tuple[list[tuple[int, float]], float]:
    """(a): the base architecture (``config``) from a random init, every weight trained on the concept's pairs."""
    model = build_base(config, seed=1)
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


def family_soup(x: torch.Tensor, families: list[str], family: str) -> torch.Tensor:
    """(h): the mean of the rows of ``family``; for a composition no row has, the rows of the same families
    in either order, else the mean of its parts' soups (every single family has training rows)."""
    parts = sorted(family.split(COMPOSE))
    for same in (lambda f: f == family, lambda f: sorted(f.split(COMPOSE)) == parts):
        picked = [i for i, f in enumerate(families) if same(f)]
        if picked:
            return x[picked].mean(0)
    return torch.stack([family_soup(x, families, p) for p in parts]).mean(0)


def check_disjoint(train_rows, held) -> None:
    """Refuse a held-out draw that repeats a training concept or a training composition (in its order)."""
    seen = {json.dumps(r.attributes, sort_keys=True) for r in train_rows}
    combos = {r.attributes["family"] for r in train_rows if COMPOSE in r.attributes["family"]}
    bad = [r.prompt for r in held if json.dumps(r.attributes, sort_keys=True) in seen or r.attributes["family"] in combos]
    if bad:
        raise SystemExit(f"held-out concepts that are training concepts: {bad}")


def generate(wdiff: str, held) -> tuple[torch.Tensor, float, WeightDiffusionModel]:
    """(rows, seconds per generated LoRA, model) of a generator for the held-out concepts."""
    model = WeightDiffusionModel.load(wdiff)
    t0 = time.perf_counter()
    gen = model.generate_attributes([r.attributes for r in held])
    return gen, (time.perf_counter() - t0) / len(held), model


def starts(args, dataset: str, wdiffs: dict[str, str], train_rows, held) -> dict[str, list]:
    ds = Dataset(dataset)
    by_id = {}
    for table, w in ds.iter_batches(["id"]):
        for i, rid in enumerate(table.column("id").to_pylist()):
            by_id[rid] = ds.layout.as_tensor(w[i]).float()
    rows = [r for r in train_rows if r.id in by_id]
    x = torch.stack([by_id[r.id] for r in rows])
    cond = StructuredCondition.fit([r.attributes for r in train_rows])
    feats, queries = cond.encode_many([r.attributes for r in rows]), cond.encode_many([r.attributes for r in held])
    made = {name: generate(wdiff, held) for name, wdiff in wdiffs.items()}
    g = torch.Generator().manual_seed(args.seed)
    nearest = [x[int(torch.cdist(q[None], feats).argmin())] for q in queries]
    noise = x.std(0)
    families = [r.attributes["family"] for r in rows]
    near_idx, near_w = knn_weights(queries, feats, args.knn)
    knn = interpolate(x, near_idx, near_w)
    gauged, gauged_norms = recipe_gauged(args, ds.layout, x, nearest, made[GENERATED][0], near_idx, near_w)
    gauged_gen = {n: torch.stack(gauged[n]) for n in gauged_norms}
    model = made[GENERATED][2]
    if model.retrieval is not None and model.retrieval.k == args.knn and args.form == "rows":  # (g): its own retrieval
        torch.testing.assert_close(model.retrieve([model.text("", r.attributes) for r in held]), knn)
    return {"b_lora_init": [None] * len(held), "c_mean": [x.mean(0)] * len(held), "d_nearest": nearest,
            "e_noisy_nearest": [n + args.noise * noise * torch.randn(n.shape, generator=g) for n in nearest],
            **{name: list(gen) for name, (gen, _, _) in made.items()}, "g_knn": list(knn),
            "h_family_soup": [family_soup(x, families, r.attributes["family"]) for r in held],
            "d_nearest_svd": list(svd_form(ds.layout, torch.stack(nearest))),
            "g_knn_svd": list(mean_edit(ds.layout, x, near_idx, near_w)),
            **gauged, "_train": x, "_gen": {**{name: gen for name, (gen, _, _) in made.items()}, **gauged_gen},
            "_gen_s": {**{name: s for name, (_, s, _) in made.items()}, **{n: made[GENERATED][1] for n in gauged_gen}},
            # the form a generator's rows are in: the training rows are compared with them in that form
            "_form": {**{name: functools.partial(svd_form, ds.layout) if m.config.form == "svd" else (lambda r: r)
                         for name, (_, _, m) in made.items()},
                      **{n: functools.partial(svd_form, ds.layout, norms=gauged_norms[n]) for n in gauged_gen}}}


def gauge_names(scale: float) -> tuple[str, ...]:
    tail = "_rg" if scale == 1 else f"_rg{scale:g}"
    return tuple(n + tail for n in ("c_mean", "d_nearest", GENERATED, "g_knn"))


def recipe_gauged(args, layout, x, nearest, gen, near_idx, near_w) -> tuple[dict[str, list], dict[str, list[float]]]:
    """(c), (d), (f) and (g) in the recipe's gauge, for each ``--gauge-scale``: the edit of each unchanged;
    and the A norms of each generated start's gauge."""
    out, made, base = {}, {}, a_norms(layout, x)
    everything = torch.arange(len(x))[None]  # (c): one query over every row, the same start for each concept
    for scale in args.gauge_scale:
        norms = [scale * n for n in base]
        c, d, f, g = gauge_names(scale)
        out[c] = list(mean_edit(layout, x, everything, torch.full(everything.shape, 1 / len(x)), norms)) * len(nearest)
        out[d] = list(svd_form(layout, torch.stack(nearest), norms))
        out[f] = list(svd_form(layout, gen, norms))
        out[g] = list(mean_edit(layout, x, near_idx, near_w, norms))
        made[f] = norms
    return out, made


def step_seconds(model, pairs, cfg: EditFinetuneConfig, layout, steps: int = 60) -> dict[str, float]:
    """Seconds per optimiser step of one concept trained alone (no packing), LoRA and full: the fair unit."""
    one = cfg.model_copy(update={"steps": steps, "check_every": steps})
    train_concepts(model, pairs[:1], one.model_copy(update={"steps": 5}), layout)  # warm-up
    t0 = time.perf_counter()
    train_concepts(model, pairs[:1], one, layout)
    lora = (time.perf_counter() - t0) / steps
    full = full_training(model.config, pairs[0], steps, steps, 2e-3, cfg.pairs_per_step)[1]
    return {"lora": lora, "full": full}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/czoo")
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--heldout", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="held-out draw (training concepts unchanged)")
    p.add_argument("--base-steps", type=int, default=2000)
    p.add_argument("--method", default=DEFAULT_METHOD, help="EditFinetuneConfig.method of the dataset's rows")
    p.add_argument("--ft-steps", type=int, default=300, help="fine-tune steps of each training concept")
    p.add_argument("--ft-lr", type=float, default=1e-2, help="LoRA learning rate (training rows and every start)")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--adam-eps", type=float, default=EditFinetuneConfig().adam_epsilon, help="LoRA AdamW epsilon")
    p.add_argument("--budget", type=int, default=300, help="LoRA steps per held-out start")
    p.add_argument("--full-steps", type=int, default=300, help="steps of (a), the from-scratch baseline")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--diffusion-steps", type=int, default=4000)
    p.add_argument("--diffusion-width", type=int, default=128)
    p.add_argument("--diffusion-depth", type=int, default=3)
    p.add_argument("--diffusion-lr", type=float, default=1e-3)
    p.add_argument("--residual-k", type=int, default=4, help="generator: retrieval of k rows + correction (0: plain)")
    p.add_argument("--knn", type=int, default=4, help="(g): rows interpolated (the generator's retrieval rule)")
    p.add_argument("--objective", choices=("weights", "task"), default="task",
                   help="generator objective: stored rows only, or also the edit loss through the frozen base")
    p.add_argument("--task-weight", type=float, default=WeightDiffusionConfig.model_fields["task_weight"].default,
                   help="weight of the task loss next to the weight loss (--objective task)")
    p.add_argument("--task-pairs", type=int, default=WeightDiffusionConfig.model_fields["task_pairs"].default,
                   help="examples per row per step of the task loss (--objective task)")
    p.add_argument("--inner-steps", type=int, default=0,
                   help="--objective task: score rows after this many simulated fine-tune steps (first-order)")
    p.add_argument("--inner-lr", type=float, default=None, help="their learning rate (default: the rows' own)")
    p.add_argument("--form", choices=("rows", "svd"), default="rows", help="generator: rows as stored or in the SVD form")
    p.add_argument("--also", nargs="+", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help=f"more generators, each the main one with these changes ({', '.join(ALSO)}); each is one more "
                   "start (f:<changes>), trained and scored in this run beside the same baselines")
    p.add_argument("--draw", default=None, help="held-out draw prefix (default: heldout, heldout<seed>); "
                   "'validation' is the draw configurations are chosen on")
    p.add_argument("--gauge-scale", type=float, nargs="*", default=[1.0], metavar="S",
                   help="starts (*_rg) in the recipe's gauge, A rows at S x the training rows' median A norm")
    p.add_argument("--starts", nargs="+", default=None, help="score only these starts (default: every one)")
    p.add_argument("--noise", type=float, default=0.5, help="(e): noise std as a multiple of each parameter's std")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args()


def generator(args, base: str, dataset: str) -> str:
    """The structured weight generator on the dataset, in a folder named by its settings (reused)."""
    residual = f"-rk{args.residual_k}" if args.residual_k else ""  # today's folders keep their names
    wdiff = f"{dataset}-wdiff-{args.diffusion_steps}-{args.diffusion_width}-{args.diffusion_depth}-{args.diffusion_lr}{residual}"
    wdiff += f"-task{args.task_weight}" if args.objective == "task" else ""
    if args.objective == "task" and (args.inner_steps or args.task_pairs != 2):
        wdiff += f"-p{args.task_pairs}-inner{args.inner_steps}-{args.inner_lr}"
    wdiff += "-svd" if args.form == "svd" else ""
    t1 = time.perf_counter()
    train_weight_diffusion(WeightDiffusionConfig(
        dataset=dataset, base=base, out=wdiff, condition="structured", steps=args.diffusion_steps, block_size=256,
        width=args.diffusion_width, depth=args.diffusion_depth, learning_rate=args.diffusion_lr,
        residual_k=args.residual_k, checkpoint_every=args.diffusion_steps, objective=args.objective,
        task_weight=args.task_weight, task_pairs=args.task_pairs, inner_steps=args.inner_steps,
        inner_lr=args.inner_lr, form=args.form))
    print(f"generator: {time.perf_counter() - t1:.0f} s", flush=True)
    return wdiff


def also(args, spec: str) -> argparse.Namespace:
    """The generator settings of one ``--also`` item: the main ones with its KEY=VALUE changes (typed as theirs)."""
    changes = dict(kv.split("=", 1) for kv in spec.split(","))
    bad = sorted(set(changes) - set(ALSO))
    if bad:
        raise SystemExit(f"--also: {bad} are not generator settings ({', '.join(ALSO)})")
    kinds = {k: float if getattr(args, k) is None else type(getattr(args, k)) for k in changes}
    typed = {k: None if v == "None" else kinds[k](v) for k, v in changes.items()}
    return argparse.Namespace(**{**vars(args), **typed})


def start_names(args) -> tuple[str, ...]:
    """The starts this run scores: every one, or ``--starts`` (and (b), the goal's unit); an unknown name is
    refused in one line before anything is built."""
    names = (*STARTS, *(f"f:{a}" for a in args.also), *(n for s in args.gauge_scale for n in gauge_names(s)))
    unknown = sorted(set(args.starts or ()) - set(names))
    if unknown:
        raise SystemExit(f"--starts: {unknown} are not starts of this run ({', '.join(names)})")
    return tuple(n for n in names if args.starts is None or n in args.starts or n == "b_lora_init")


def main() -> None:
    args = parse_args()
    names = start_names(args)
    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()  # folders are recorded in configs: one spelling per folder
    work.mkdir(parents=True, exist_ok=True)
    cfg = EditFinetuneConfig(method=args.method, steps=args.ft_steps, learning_rate=args.ft_lr, rank=args.rank,
                             alpha=args.rank, adam_epsilon=args.adam_eps, pack=32)
    t0 = time.perf_counter()
    base, dataset, train_rows = build(args, work, cfg)
    wdiffs = {GENERATED: generator(args, base, dataset), **{f"f:{a}": generator(also(args, a), base, dataset) for a in args.also}}
    # heldout_rows' seed also picks the banned compositions, which must stay the training set's: the prefix
    # seeds the draw alone (seed 0 keeps the documented set and its ids).
    held = heldout_rows(args.heldout, prefix=args.draw or ("heldout" if args.seed == 0 else f"heldout{args.seed}"))
    check_disjoint(train_rows, held)
    model = load_base(base)
    size = model.config.image_size
    pairs = [concept_pairs(r, None, train=cfg.train_pairs, held_out=cfg.eval_pairs, size=size, data_seed=0) for r in held]
    init = starts(args, dataset, wdiffs, train_rows, held)
    run_cfg = cfg.model_copy(update={"steps": args.budget, "check_every": args.budget})
    layout = edit_layout(model, run_cfg)
    curves: dict[str, list] = {}
    for name in names:
        t1 = time.perf_counter()
        runs = train_concepts(model, pairs, run_cfg, layout, init[name], eval_every=args.eval_every)
        curves[name] = [r.psnr for r in runs]
        print(f"{name}: {time.perf_counter() - t1:.0f} s", flush=True)
    full = [full_training(model.config, pr, args.full_steps, args.eval_every, 2e-3, cfg.pairs_per_step) for pr in pairs]
    curves["a_pix2pix"] = [c for c, _ in full]
    secs = step_seconds(model, pairs, cfg, layout)
    draw = f"-{args.draw}" if args.draw else ""
    extra = "".join(f"+{a}" for a in args.also)
    results = work / f"results-{Path(wdiffs[GENERATED]).name}{extra}-seed{args.seed}{draw}-h{args.heldout}-knn{args.knn}-b{args.budget}.json"
    report(args, held, curves, secs, init, results, time.perf_counter() - t0, names)


def seconds_to_target(name: str, steps: int | None, secs: dict[str, float]) -> float:
    """Wall time of one concept trained alone to its target: steps x seconds per step (+ generating it)."""
    if steps is None:
        return math.inf
    return steps * secs["full" if name == "a_pix2pix" else "lora"] + secs["generate"].get(name, 0.0)


def concept_rows_table(args, held, curves, secs, names) -> tuple[list[dict], list[str]]:
    """Per concept: target, steps and seconds to it, PSNR curve of every start; and the markdown rows."""
    rows, table = [], []
    for k, r in enumerate(held):
        target = curves["a_pix2pix"][k][-1][1]
        steps = {n: first_at(curves[n][k], target) for n in names}
        rows.append({"id": r.id, "prompt": r.prompt, "target": target, "steps": steps,
                     "seconds": {n: seconds_to_target(n, steps[n], secs) for n in names},
                     "psnr_at": {n: dict(curves[n][k]) for n in names}})
        cells = " | ".join(str(steps[n]) if steps[n] is not None else f">{args.full_steps if n == 'a_pix2pix' else args.budget}"
                           for n in names)
        table.append(f"| {r.prompt} | {target:.1f} | {cells} |")
    return rows, table


def start_summary(args, rows, names) -> list[str]:
    """One markdown line per start: reached, median steps and seconds, PSNR at fixed steps."""
    med_a = statistics.median(r["seconds"]["a_pix2pix"] for r in rows)
    lines = []
    for n in names:
        got = [r["steps"][n] for r in rows if r["steps"][n] is not None]
        med = statistics.median(r["seconds"][n] for r in rows)
        end = args.full_steps if n == "a_pix2pix" else args.budget
        at = [statistics.median(r["psnr_at"][n].get(s, math.nan) for r in rows) for s in (0, 20, 60, end)]
        steps_med = statistics.median([r["steps"][n] if r["steps"][n] is not None else math.inf for r in rows])
        lines.append(f"| {n} | {len(got)}/{len(rows)} | {steps_med} | {med:.3f} | {med_a / med if med else math.inf:.1f}x | "
                     + " | ".join(f"{v:.1f}" for v in at) + " |")
    return lines


def _fewer(r: dict, f: str, other: str) -> bool:
    """Start ``f`` needs strictly fewer steps than ``other`` (a start that never reaches counts as infinitely many)."""
    mine, o = r["steps"][f], r["steps"][other]
    return mine is not None and (o is None or mine < o)


def goals(rows: list[dict], init: dict, f: str, names: tuple[str, ...]) -> dict:
    """The issue's goal checks for generator start ``f``: shares of strict wins over the concepts any LoRA start
    reaches, median time ratios (b)/(f) and (a)/(f), and whether generated rows are copies of training rows."""
    lora = [n for n in names if n != "a_pix2pix"]
    reached = [r for r in rows if any(r["steps"][n] is not None for n in lora)]
    share = {o: sum(_fewer(r, f, o) for r in reached) / len(reached) if reached else 0.0 for o in lora if o != f}
    med = {n: statistics.median(r["seconds"][n] for r in rows) for n in ("a_pix2pix", "b_lora_init", f)}
    # (f) never reaching the median: 0 against a start that does, undefined (nan) against one that does not either
    ratio = {n: med[n] / med[f] if med[f] < math.inf else (math.nan if med[n] == math.inf else 0.0)
             for n in ("a_pix2pix", "b_lora_init")}
    x, gen = init["_form"][f](init["_train"]), init["_gen"][f]  # training rows in the generated rows' form
    d_train = torch.cdist(x, x)
    typical = d_train[~torch.eye(len(x), dtype=torch.bool)].median()
    return {"start": f, "reached_by_any_lora_start": len(reached), "f_fewer_steps_share": share,
            "median_s_ratio_b_over_f": ratio["b_lora_init"], "median_s_ratio_a_over_f": ratio["a_pix2pix"],
            "gen_to_nearest_train_median": float(torch.cdist(gen, x).min(1).values.median()),
            "train_to_nearest_train_median": float(d_train.fill_diagonal_(math.inf).min(1).values.median()),
            "train_pairwise_median": float(typical)}


def print_goals(g: dict, n: int) -> None:
    m, f = g["reached_by_any_lora_start"], g["start"]
    shares = ", ".join(f"{o} {v:.0%}{' ok' if v >= GOAL_SHARE else ''}" for o, v in g["f_fewer_steps_share"].items())
    missing = [o for o in BEAT if o not in g["f_fewer_steps_share"]]
    met = not missing and all(g["f_fewer_steps_share"][o] >= GOAL_SHARE for o in BEAT)
    verdict = f"not checked ({', '.join(missing)} not scored)" if missing else "met" if met else "not met"
    print(f"goal ({f}): strictly fewer steps on >= {GOAL_SHARE:.0%} of the {m}/{n} concepts any LoRA start reaches, "
          f"against each of {', '.join(BEAT)}: {verdict} ({shares})")
    for key, goal, name in (("median_s_ratio_b_over_f", GOAL_B, "(b)"), ("median_s_ratio_a_over_f", GOAL_A, "(a)")):
        print(f"goal ({f}): median time to target {name} / this >= {goal}x: {g[key]:.2f}x, {'met' if g[key] >= goal else 'not met'}")
    print(f"not copies ({f}): generated row to its nearest training row (median) {g['gen_to_nearest_train_median']:.3f}; "
          f"training row to its nearest other training row {g['train_to_nearest_train_median']:.3f}; "
          f"between training rows {g['train_pairwise_median']:.3f}")


def report(args, held, curves, secs, init, results: Path, total: float, starts: tuple[str, ...]) -> None:
    names = ("a_pix2pix", *starts)
    secs = {**secs, "generate": {n: v for n, v in init["_gen_s"].items() if n in starts}}
    rows, table = concept_rows_table(args, held, curves, secs, names)
    checks = [goals(rows, init, f, names) for f in init["_gen"] if f in names]
    summary = {"args": vars(args), "total_s": total, "seconds_per_step": secs, "rows": rows, "goals": checks}
    results.write_text(json.dumps(summary, indent=1, default=str))
    print("| held-out concept | target dB | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    print("\n".join(table))
    made = ", ".join(f"{f} {v:.4f}" for f, v in secs["generate"].items())
    print(f"\nseconds per step, one concept alone: full {secs['full']:.4f}, LoRA {secs['lora']:.4f}; "
          f"generating one LoRA: {made} s")
    print("| start | reached | median steps | median s to target | (a) / this, median s | PSNR at 0 | PSNR at 20 | PSNR at 60 | PSNR at budget |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(start_summary(args, rows, names)))
    for g in checks:
        print_goals(g, len(rows))
    print(f"results {results}; total {total:.0f} s")


if __name__ == "__main__":
    main()
