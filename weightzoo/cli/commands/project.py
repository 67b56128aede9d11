"""``weightzoo project``: a row or LoRA file → subspace coordinates and relative reconstruction error."""

from __future__ import annotations

import argparse
import json

HELP = "Print the coordinates of a row or LoRA file in a subspace, and what they fail to explain."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("project", help=HELP)
    p.add_argument("--subspace", required=True, help="Subspace URI written by fit-subspace.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--id", help="Row id (read from --dataset, default the subspace's dataset).")
    src.add_argument("--lora", help="A diffusers LoRA .safetensors file (e.g. from export or sample).")
    p.add_argument("--dataset", help="Dataset URI holding --id (default: the one the subspace was fitted on).")
    p.add_argument("--json", action="store_true", help="Print JSON with every coordinate.")
    p.set_defaults(func=run)


def lora_file(uri: str) -> str:
    """``--lora`` as a file: a folder stands for its ``pytorch_lora_weights.safetensors`` (as sample writes)."""
    from weightzoo.errors import NotFoundError
    from weightzoo.storage.fs import filesystem, join

    fs, path = filesystem(uri)
    if fs.isdir(path):
        uri, path = join(uri, "pytorch_lora_weights.safetensors"), join(path, "pytorch_lora_weights.safetensors")
    if not fs.isfile(path):
        raise NotFoundError(f"--lora not found at {uri}")
    return uri


def run(args: argparse.Namespace) -> int:
    lora = lora_file(args.lora) if args.lora else None
    from weightzoo.tasks.finetune.starts import load_lora_vector
    from weightzoo.tasks.subspace.pca import load_subspace
    from weightzoo.tasks.subspace.w2w import dataset_row, project

    sub = load_subspace(args.subspace)
    x = load_lora_vector(lora, sub.layout) if lora else dataset_row(sub, args.id, args.dataset)[1]
    p = project(sub, x)
    out = {"source": args.lora or args.id, "rel_error": p.rel_error, "rel_error_standardised": p.rel_error_standardised,
           "coords": [round(float(c), 6) for c in p.coords]}
    if args.json:
        print(json.dumps(out))
    else:
        head = ", ".join(f"{c:.3g}" for c in out["coords"][:8])
        print(f"{out['source']}: relative error {p.rel_error:.4f} (standardised {p.rel_error_standardised:.4f}); "
              f"coords [{head}{', ...' if sub.k > 8 else ''}]")
    return 0
