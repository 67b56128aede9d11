"""``--preview``: a PNG beside a written LoRA, drawn by a base that can draw (a world base), so a user sees
what the LoRA does without a script."""

from __future__ import annotations

import argparse

BASE_HELP = ("Also write <lora>.preview.png: pictures of the prompt from this base (a world base, "
             "`weightzoo base --kind world`) with the new LoRA loaded.")


def add_preview(p: argparse.ArgumentParser, takes_base: bool = True) -> None:
    """``--preview BASE``, or a plain ``--preview`` switch for a command that already has ``--base``."""
    if takes_base:
        p.add_argument("--preview", metavar="BASE", help=BASE_HELP)
    else:
        p.add_argument("--preview", action="store_true",
                       help="Also write <lora>.preview.png: pictures of the prompt from --base with the new LoRA "
                       "loaded (a world base only: other bases' pictures are noise).")


def write_preview(base: str | None, lora_path: str, prompt: str) -> None:
    """Draw and print the preview, or say why there is none."""
    if not base:
        return
    from weightzoo.tasks.world.previews import lora_file_preview

    out = lora_file_preview(base, lora_path, prompt)
    print(f"wrote {out}" if out else f"no preview: {base} is no world base (its pictures would be noise)")


def write_edit_preview(base: str, sub, meta: dict, weights, edited_path: str, edit: str) -> None:
    """Draw the row before and after its edit side by side, or say why there is none."""
    from weightzoo.tasks.world.previews import edit_preview

    out = edit_preview(base, weights, sub.layout, meta["hparams"] or {}, edited_path, meta["prompt"], edit)
    print(f"wrote {out}" if out else f"no preview: {base} is no world base (its pictures would be noise)")


def subspace_prompt(sub) -> str:
    """The instance prompt of the subspace's first fitted row (every row of a dataset shares its prompt)."""
    return sub.coords_table().column("prompt")[0].as_py()
