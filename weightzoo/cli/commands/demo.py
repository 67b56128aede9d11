"""``weightzoo demo``: the whole pipeline on the embedded default, in one work folder."""

from __future__ import annotations

import argparse
import json

HELP = "Run the whole pipeline on a tiny offline base model and synthetic subjects (~2 min on 2 CPU cores)."

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help=HELP,
        description="Builds DIR/base (tiny SD-style pipeline), DIR/manifest.jsonl + DIR/images/ (synthetic subjects), "
        "fine-tunes one LoRA per subject into DIR/dataset, fits DIR/subspace and trains DIR/wdiff. "
        "Rerunning resumes: committed subjects are not trained again.",
    )
    from weightzoo.flows.concept_pipeline import ConceptPipelineConfig
    from weightzoo.flows.pipeline import PipelineConfig

    identity, edit = PipelineConfig.model_fields, ConceptPipelineConfig.model_fields
    p.add_argument("--workdir", default="work/demo", help="Work folder.")
    p.add_argument("--kind", choices=["identity", "edit"], default="identity",
                   help="identity: the text-to-image pipeline; edit: image-editing concepts on a small "
                   "image-to-image base (docs/CONCEPTS.md).")
    p.add_argument("--subjects", type=int, default=None,
                   help=f"Synthetic subjects (identity; default {identity['subjects'].default}) or editing concepts "
                   f"(edit; default {edit['concepts'].default}), one LoRA each.")
    p.add_argument("--steps", type=int, default=None,
                   help=f"Fine-tune steps per LoRA (default {identity['finetune'].default.steps} for identity, "
                   f"{edit['finetune'].default.steps} for edit: the tiny bases learn fast).")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace, model: type, count_field: str):
    """The pipeline's config from the flags the user set (the model supplies every other default)."""
    from pathlib import Path

    fields: dict = {"workdir": str(Path(args.workdir).resolve())}
    if args.subjects is not None:
        fields[count_field] = args.subjects
    if args.steps is not None:
        fields["finetune"] = model.model_fields["finetune"].default.model_copy(update={"steps": args.steps})
    return model(**fields)


def run_edit(args: argparse.Namespace) -> int:
    """The concept workload: edit base, concept manifest, edit-lora dataset, structured weight generator."""
    from weightzoo.flows.concept_pipeline import ConceptPipelineConfig, concept_pipeline

    config = _config(args, ConceptPipelineConfig, "concepts")
    out = concept_pipeline(config)
    build = out["build"]
    print(f"\nweightzoo demo --kind edit finished in {config.workdir}")
    print(f"  edit base    {out['base']}  (SkipUNetGenerator, config.json + model.safetensors)")
    print(f"  manifest     {out['manifest']}  (procedural edit specs)")
    print(f"  dataset      {out['dataset']}  ({build['committed']} committed, {build['failed']} failed of {build['total']})")
    print(f"  weight gen.  {out['wdiff']}  (structured condition)")
    print(f"\nNext:\n  weightzoo export --dataset {out['dataset']} --id edit-00000 --format peft --out lora-edit")
    return 0


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.kind == "edit":
        return run_edit(args)

    from weightzoo.flows.pipeline import PipelineConfig, pipeline

    config = _config(args, PipelineConfig, "subjects")
    out = pipeline(config)
    build = out["build"]
    print()
    print(f"weightzoo demo finished in {config.workdir}")
    print(f"  base model   {out['base']}  (tiny SD-style pipeline, save_pretrained format)")
    print(f"  manifest     {out['manifest']}  (images in {Path(out['manifest']).parent / 'images'})")
    print(f"  dataset      {out['dataset']}  ({build['committed']} committed, {build['failed']} failed, {build['pending']} pending)")
    print(f"  subspace     {out['subspace']}")
    print(f"  weight diff. {out['wdiff']}")
    print()
    print("Next:")
    print(f"  weightzoo status --dataset {out['dataset']} --json")
    some_id = json.loads(Path(out["manifest"]).read_text().splitlines()[0])["id"]
    print(f"  weightzoo export --dataset {out['dataset']} --id {some_id} --out lora/pytorch_lora_weights.safetensors")
    print("  Prefect UI (shows these runs: they are in the same local Prefect database):")
    print("    .venv/bin/prefect server start   then open http://127.0.0.1:4200/runs")
    return 0
