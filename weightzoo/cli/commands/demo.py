"""``weightzoo demo``: the whole pipeline on the embedded default, in one work folder."""

from __future__ import annotations

import argparse
import json

HELP = "Run the whole pipeline on a tiny offline base that draws, one LoRA per subject (a few minutes on 2 CPU cores)."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help=HELP,
        description="Builds DIR/base (the world base weightzoo ships, pretrained to draw a procedural world; "
        "--base toy: the random-weights tiny SD-style pipeline), "
        "DIR/manifest.jsonl + DIR/images/ (subjects), fine-tunes one LoRA per subject into DIR/dataset, writes "
        "DIR/previews/<id>.png (world base), "
        "fits DIR/subspace and trains DIR/wdiff. "
        "Rerunning resumes: committed subjects are not trained again.",
    )
    from weightzoo.flows.config import WORKLOADS
    from weightzoo.tasks.identity.families import FAMILIES
    from weightzoo.tasks.world.config import WORLD_FINETUNE

    identity, edit = WORKLOADS["identity"], WORKLOADS["edit"]
    p.add_argument("--workdir", default="work/demo", help="Work folder.")
    p.add_argument("--kind", choices=list(WORKLOADS), default="identity",
                   help="identity: the text-to-image pipeline; edit: image-editing concepts on a small "
                   "image-to-image base (docs/CONCEPTS.md).")
    p.add_argument("--subjects", type=int, default=None,
                   help=f"Synthetic subjects (identity; default {identity['items']}) or editing concepts "
                   f"(edit; default {edit['items']}), one LoRA each.")
    p.add_argument("--base", choices=("world", "toy"), default="world", dest="identity_base",
                   help="identity: 'world' is a tiny base that draws a procedural world of subjects, so each "
                   "row's LoRA visibly draws its subject (DIR/previews/*.png); 'toy' is the random-weights "
                   "SD-1.5-shaped pipeline (mechanics only: its pictures are noise).")
    p.add_argument("--family", choices=list(FAMILIES), default=None,
                   help="identity with --base toy: model family of the tiny pipeline (default sd).")
    p.add_argument("--steps", type=int, default=None,
                   help=f"Fine-tune steps per LoRA (default {WORLD_FINETUNE['steps']} on the world base, "
                   f"{identity['finetune'].steps} on the toy one, {edit['finetune'].steps} for edit: the tiny bases "
                   "learn fast).")
    p.set_defaults(func=run)


def pipeline_config(args: argparse.Namespace):
    """The pipeline's config from the flags the user set (the model and its workload supply every other default)."""
    from pathlib import Path

    from weightzoo.flows.config import WORKLOADS, WORLD_IDENTITY, PipelineConfig

    fields: dict = {"workdir": str(Path(args.workdir).resolve()), "workload": args.kind,
                    "identity_base": args.identity_base}
    if args.subjects is not None:
        fields["items"] = args.subjects
    if args.family is not None:
        fields["family"] = args.family  # the toy base's; the world base refuses any but sd, in one line
    if args.steps is not None:
        world = args.kind == "identity" and args.identity_base == "world"
        fields["finetune"] = (WORLD_IDENTITY if world else WORKLOADS[args.kind]["finetune"]).model_copy(
            update={"steps": args.steps})
    return PipelineConfig(**fields)


def _print_edit(out: dict) -> None:
    build = out["build"]
    print(f"  edit base    {out['base']}  (SkipUNetGenerator, config.json + model.safetensors)")
    print(f"  manifest     {out['manifest']}  (procedural edit specs)")
    print(f"  dataset      {out['dataset']}  ({build['committed']} committed, {build['failed']} failed of {build['total']})")
    print(f"  weight gen.  {out['wdiff']}  (structured condition)")
    print(f"\nNext:\n  weightzoo export --dataset {out['dataset']} --id edit-00000 --format peft --out lora-edit")


def _print_identity(out: dict) -> None:
    from pathlib import Path

    build = out["build"]
    world = bool(out.get("previews"))
    what = "world base: draws the procedural world" if world else "tiny SD-style pipeline, random weights"
    print(f"  base model   {out['base']}  ({what}; save_pretrained format)")
    print(f"  manifest     {out['manifest']}  (images in {Path(out['manifest']).parent / 'images'})")
    print(f"  dataset      {out['dataset']}  ({build['committed']} committed, {build['failed']} failed, {build['pending']} pending)")
    print(f"  subspace     {out['subspace']}")
    print(f"  weight diff. {out['wdiff']}")
    if world:
        print(f"  previews     {Path(out['previews'][0]['png']).parent}  ({len(out['previews'])} grids: prompt "
              "without LoRA, with LoRA, training images)")
    print()
    print("Next:")
    print(f"  weightzoo status --dataset {out['dataset']} --json")
    some_id = json.loads(Path(out["manifest"]).read_text().splitlines()[0])["id"]
    print(f"  weightzoo export --dataset {out['dataset']} --id {some_id} --out lora/pytorch_lora_weights.safetensors")
    print("  Prefect UI (shows these runs: they are in the same local Prefect database):")
    print("    .venv/bin/prefect server start   then open http://127.0.0.1:4200/runs")


def run(args: argparse.Namespace) -> int:
    from weightzoo.flows.pipeline import pipeline

    config = pipeline_config(args)
    out = pipeline(config)
    print(f"\nweightzoo demo{' --kind edit' if config.workload == 'edit' else ''} finished in {config.workdir}")
    (_print_edit if config.workload == "edit" else _print_identity)(out)
    return 0
