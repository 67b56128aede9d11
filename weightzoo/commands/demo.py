"""``weightzoo demo``: the whole pipeline on the embedded default, in one work folder."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="Run the whole pipeline on a tiny offline base model and synthetic subjects (~2 min on 2 CPU cores).",
        description="Builds DIR/base (tiny SD-style pipeline), DIR/manifest.jsonl + DIR/images/ (synthetic subjects), "
        "fine-tunes one LoRA per subject into DIR/dataset, fits DIR/subspace and trains DIR/wdiff. "
        "Rerunning resumes: committed subjects are not trained again.",
    )
    p.add_argument("--workdir", default="work/demo", help="Work folder (default work/demo).")
    p.add_argument("--subjects", type=int, default=16, help="Synthetic subjects, one LoRA each (default 16).")
    p.add_argument("--steps", type=int, default=None, help="Fine-tune steps per subject (default 60 for the tiny model).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from weightzoo.flows.pipeline import PipelineRequest, pipeline

    fields: dict = {"workdir": str(Path(args.workdir).resolve()), "subjects": args.subjects}
    if args.steps is not None:
        fields["finetune"] = PipelineRequest.model_fields["finetune"].default.model_copy(update={"steps": args.steps})
    out = pipeline(PipelineRequest(**fields))
    build = out["build"]
    print()
    print(f"weightzoo demo finished in {fields['workdir']}")
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
