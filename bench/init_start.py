"""`weightzoo init` end to end on the edit demo: does the start it writes fine-tune faster than a LoRA init?

Runs (or reuses, under ``--workdir``) ``weightzoo demo --kind edit``: base, 48 concepts, their rows and the
default generator (residual on the 4 nearest rows, objective task), which holds out ~10 % of the concepts.
For each held-out concept, ``weightzoo init`` (the CLI, ``--start`` each of auto, generated) writes a start
from the generator; then the held-out concepts are built twice more through ``run_batch`` (the build's
path) with the demo's recipe: from the standard LoRA init, and with each manifest row's ``init`` naming its
start. Target: the loss the standard start reaches at the end of its steps (a 5-step running mean of the
per-step training loss; every start sees the same pairs at each step). Steps to the target per start and
concept, and the share of concepts each start reaches in strictly fewer steps than the standard one.

Run: ``.venv/bin/python bench/init_start.py`` (~4 min on 2 cores with the demo; seconds when it is kept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from weightzoo.storage.dataset import Dataset
from weightzoo.tasks.finetune.batch import run_batch
from weightzoo.tasks.finetune.readers import read_manifest

WINDOW = 5  # steps in the running mean the target is read on


def running(curve: list[float]) -> np.ndarray:
    c = np.cumsum(np.asarray(curve, dtype=np.float64))
    out = np.empty(len(curve))
    out[:WINDOW] = c[:WINDOW] / np.arange(1, min(WINDOW, len(curve)) + 1)
    out[WINDOW:] = (c[WINDOW:] - c[:-WINDOW]) / WINDOW
    return out


def steps_to(curve: np.ndarray, target: float) -> float:
    hit = np.nonzero(curve <= target)[0]
    return float(hit[0] + 1) if len(hit) else float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="work/init_start")
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    cli = [str(Path(sys.executable).parent / "weightzoo")]
    if not (work / "wdiff" / "checkpoints" / "latest.json").exists():
        subprocess.run([*cli, "demo", "--kind", "edit", "--workdir", str(work)], check=True)
    held = json.loads((work / "wdiff" / "split.json").read_text())["holdout"]
    rows = {r.id: r for r in read_manifest(str(work / "manifest.jsonl"))}
    card = json.loads((work / "dataset" / "dataset_card.json").read_text())
    from weightzoo.tasks.concepts.config import EditFinetuneConfig

    config = EditFinetuneConfig(**{**card["config"], "loss_window": 1})  # the demo's recipe, every step's loss kept
    curves: dict[str, dict[str, np.ndarray]] = {}
    for start in ("standard", "auto", "generated"):
        folder = work / "init_bench" / start
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "manifest.jsonl"
        lines = []
        for i in held:
            row = rows[i].model_dump(mode="json", exclude_none=True)
            row["images"] = [str(work / u) for u in row.get("images", [])]
            if start != "standard":
                out = folder / f"{i}.safetensors"
                attrs = [a for k, v in rows[i].attributes.items() for a in ("--attr", f"{k}={v}")]
                subprocess.run([*cli, "init", "--model", str(work / "wdiff"), *attrs, "--start", start,
                                "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
                row["init"] = out.name
            lines.append(json.dumps(row))
        manifest.write_text("\n".join(lines) + "\n")
        dataset = folder / "dataset"
        run_batch("b-held", held, str(manifest), str(work / "base"), str(dataset), config, engine="edit-lora")
        ds = Dataset(str(dataset))
        table = ds.metadata(["id", "loss_history"])
        curves[start] = {i: running(h) for i, h in zip(table.column("id").to_pylist(),
                                                       table.column("loss_history").to_pylist(), strict=True)}
        assert sorted(ds.ids) == sorted(held) and len(set(ds.ids)) == len(held), "every held-out row, once"
    print(f"\nweightzoo init on the edit demo: {len(held)} held-out concepts, {config.steps} steps, target = the "
          f"standard start's final {WINDOW}-step running loss")
    print("| concept | target loss | standard | init auto (retrieved) | init generated |")
    print("|---|---:|---:|---:|---:|")
    wins = {"auto": 0, "generated": 0}
    for i in held:
        target = float(curves["standard"][i][-1])
        steps = {s: steps_to(curves[s][i], target) for s in curves}
        for s in wins:
            wins[s] += steps[s] < steps["standard"]
        print(f"| {i} | {target:.4f} | " + " | ".join(f"{steps[s]:.0f}" for s in ("standard", "auto", "generated")) + " |")
    med = {s: float(np.median([steps_to(curves[s][i], float(curves["standard"][i][-1])) for i in held]))
           for s in curves}
    print(f"| median | | {med['standard']:.0f} | {med['auto']:.0f} | {med['generated']:.0f} |")
    print("strictly fewer steps than the standard start: " + ", ".join(f"{s} {wins[s]}/{len(held)}" for s in wins))


if __name__ == "__main__":
    main()
