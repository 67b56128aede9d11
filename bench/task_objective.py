"""Task objective bench: does training the generator through the frozen base make better one-step rows?

On an edit dataset (e.g. one ``bench/concept_zoo.py`` built under its ``--work``), trains the structured
generator with ``objective weights`` and with ``objective task`` at each ``--task-weights``, then scores the
one-step generated rows of the training concepts and of ``--heldout`` held-out concepts with the edit task
loss itself (mean L1 on 16 training pairs per concept through the frozen base; lower is better), beside the
base alone, the stored rows and (``--residual-k``) the k-nearest retrieval the residual generators start from.
Also prints each generator's seconds per step. The held-out concepts are the ``--draw`` prefix's
(default "validation": disjoint from bench/concept_zoo.py's held-out draws, so choices made here are not
tuned on that bench's held-out concepts).
Run: ``.venv/bin/python bench/task_objective.py --dataset /tmp/czoo/dataset-... --base /tmp/czoo/base-2000``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.concepts.task_loss import EditTaskLoss, edit_task_loss
from weightzoo.tasks.concepts.zoo import heldout_rows
from weightzoo.tasks.diffusion.config import WeightDiffusionConfig
from weightzoo.tasks.diffusion.generator import WeightDiffusionModel, train_weight_diffusion


def retrieval(model: WeightDiffusionModel, attrs: list[dict], k: int) -> torch.Tensor:
    """(n, D): a residual generator's k-nearest retrieval for attribute dicts (k = 1: the nearest row)."""
    return dataclasses.replace(model, retrieval=dataclasses.replace(model.retrieval, k=k)).retrieve(
        [json.dumps(a) for a in attrs])


def score(loss: EditTaskLoss, ids: list[str], rows: torch.Tensor) -> float:
    with torch.no_grad():
        return float(loss(ids, rows, torch.Generator().manual_seed(0)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--base", required=True, help="the edit base the dataset's rows were trained on")
    p.add_argument("--out", default=None, help="folder for the generators (default: beside the dataset)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--heldout", type=int, default=8)
    p.add_argument("--task-weights", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--residual-k", type=int, default=0, help="train residual generators on the k nearest rows")
    p.add_argument("--draw", default="validation", help="prefix of the held-out draw (concept_zoo uses heldout*)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = Dataset(args.dataset)
    loss = edit_task_loss(args.base, ds, "cpu", pairs_per_step=16)
    held = heldout_rows(args.heldout, prefix=args.draw)
    loss.attributes.update({r.id: dict(r.attributes) for r in held})
    committed = set(ds.ids)
    train = {i: a for i, a in loss.attributes.items() if i in committed}
    held_ids, held_attrs = [r.id for r in held], [dict(r.attributes) for r in held]
    stored = torch.stack([ds.layout.as_tensor(ds.row(i)[1]).float() for i in train])
    print("| rows | training concepts | held-out concepts | s / step |\n|---|---:|---:|---:|")
    print(f"| none (base alone) | {score(loss, list(train), stored * 0):.4f} | "
          f"{score(loss, held_ids, stored[:1].expand(len(held), -1) * 0):.4f} | |")
    print(f"| stored rows | {score(loss, list(train), stored):.4f} | | |")
    out = Path(args.out or f"{args.dataset}-task-objective")
    for n, (objective, weight) in enumerate([("weights", 0.0)] + [("task", w) for w in args.task_weights]):
        folder = out / (f"{objective}-{weight}-{args.steps}" + (f"-rk{args.residual_k}" if args.residual_k else ""))
        t0 = time.perf_counter()
        train_weight_diffusion(WeightDiffusionConfig(
            dataset=args.dataset, base=args.base, out=str(folder), condition="structured", steps=args.steps,
            block_size=256, checkpoint_every=args.steps, device="cpu", objective=objective,
            residual_k=args.residual_k, **({"task_weight": weight} if objective == "task" else {})))
        seconds = (time.perf_counter() - t0) / args.steps
        model = WeightDiffusionModel.load(str(folder))
        if args.residual_k and n == 0:  # the starts a residual generator must beat
            for name, k in (("nearest row", 1), (f"{args.residual_k} nearest rows", args.residual_k)):
                print(f"| {name} (retrieval) | | {score(loss, held_ids, retrieval(model, held_attrs, k)):.4f} | |")
        with torch.no_grad():
            gen_train, gen_held = model.generate_attributes(list(train.values())), model.generate_attributes(held_attrs)
        name = "objective weights" if objective == "weights" else f"objective task, task_weight {weight:g}"
        print(f"| {name} | {score(loss, list(train), gen_train):.4f} | {score(loss, held_ids, gen_held):.4f} | "
              f"{seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
