"""Export a dataset row as a diffusers LoRA file, or as a peft adapter folder.

**diffusers** (the default, ``pytorch_lora_weights.safetensors``): a row holds the adapters exactly
as trained (A, B, no scaling). The file holds peft/diffusers keys (``unet.<module>.lora_A.weight``,
``...lora_B.weight``; ``transformer.`` for SD3 and Flux rows, whose family the row's hparams record) with the ``alpha / rank`` scale baked into ``lora_B``: diffusers loads a
peft-format file without alphas at scale 1, so baking is what makes ``pipe.load_lora_weights(path)``
reproduce the trained model in any diffusers version and any other tool reading the same format. Tensors are written as float32 so baking adds no rounding. Safetensors
only: a weights file is never a pickle.

**peft** (a folder for ``PeftModel.from_pretrained(unet, folder)``): ``adapter_config.json``, a
``LoraConfig`` with ``r`` = rank and ``lora_alpha`` = alpha, and ``adapter_model.safetensors`` with
peft's keys (``base_model.model.<module>.lora_A.weight``) holding A and B **unscaled**, exactly as
trained: peft applies ``lora_alpha / r`` itself. So the file's hparams (alpha 27) and the weights
agree; baking the scale in as well would make a peft user's update 27x too large. Its
``base_model_name_or_path`` is the base the rows were trained on (``base_name``): the base URI the
dataset's builds recorded, else the rows' base fingerprint as ``weightzoo-base-fingerprint:<fp>``.

**Other recipes** (``celeb_basis``, ...): ``export`` hands a row whose ``method`` is not a LoRA recipe to
that recipe's own export (docs/RECIPES.md); only the diffusers format applies to them.

**Merged** (``export_merged``, ``weightzoo merge``): several LoRA rows as one diffusers LoRA whose update
is the sum of theirs, ``ΔW = Σ_i s_i (alpha_i / r_i) B_i A_i``. The A's are stacked (rows) and the scaled
B's concatenated (columns) into one rank-Σr LoRA, so the sum is exact, not a re-factorisation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import safetensors.torch
import torch

from weightzoo.errors import InputError
from weightzoo.storage.fs import filesystem, join, write_bytes
from weightzoo.storage.layout import LORA_A, LORA_B, Layout
from weightzoo.storage.ledger import BUILDS

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
PEFT_CONFIG_NAME = "adapter_config.json"  # the names PeftModel.from_pretrained looks for
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the UNet as base_model (LoraModel) → .model
FORMATS = ("diffusers", "peft")
FINGERPRINT_BASE = "weightzoo-base-fingerprint:"  # a base known by its fingerprint only: no path, no Hub id
# Metadata key: the scale baked into lora_B (a reader of the file divides it out: starts.load_lora_vector).
BAKED_SCALE = "weightzoo.scale_baked_into_lora_B"


def base_name(dataset: str, fingerprint: str | None = None) -> str | None:
    """The base a dataset's rows were trained on, for peft's ``base_model_name_or_path``.

    The ``base`` of the latest build record (``<dataset>/_builds/*.json``, the resolved config): a build records
    it only after its base passed the dataset's recipe check, so it has the rows' fingerprint. It is the URI the
    build loaded (an absolute folder or ``s3://``), as peft itself records a local base. Rows committed without a
    build (the storage API) have no record: then ``weightzoo-base-fingerprint:<fp>`` names the base by the hash
    of its files (what the engine's ``fingerprint`` of a candidate folder gives), never a guessed path; None if
    neither is known."""
    fs, folder = filesystem(join(str(dataset), BUILDS))
    try:
        records = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        records = []
    for path in reversed(records):
        try:
            base = json.loads(fs.cat_file(path)).get("base")
        except (ValueError, AttributeError):  # a record that does not parse names nothing
            continue
        if isinstance(base, str) and base:
            return base
    return f"{FINGERPRINT_BASE}{fingerprint}" if fingerprint else None


def key_prefix(hparams: dict) -> str:
    """The prefix ``load_lora_weights`` expects of the row's model family: ``unet`` (sd, sdxl) or
    ``transformer`` (sd3, flux). Rows from before families were recorded are SD rows."""
    from weightzoo.tasks.identity.families import get

    return get(str(hparams.get("family", "sd"))).denoiser


def lora_key(key: str) -> str:
    """``key`` itself, refused unless it is a LoRA factor's (…lora_A.weight / …lora_B.weight)."""
    if not key.endswith((LORA_A, LORA_B)):
        raise ValueError(f"{key!r} is not a LoRA key (…lora_A.weight / …lora_B.weight); not a LoRA layout")
    return key


def lora_state_dict(weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict) -> dict[str, torch.Tensor]:
    """The diffusers-format state dict of one row: keys prefixed by the family's denoiser (``unet.``,
    ``transformer.``), float32, scale baked into B."""
    scale = float(hparams["alpha"]) / float(hparams["rank"])
    prefix = key_prefix(hparams)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in layout.unflatten(weights).items():
        t = tensor.float()
        out[f"{prefix}.{lora_key(key)}"] = (t * scale if key.endswith(LORA_B) else t).contiguous()
    return out


def _modules(layout: Layout) -> list[str]:
    """The adapted modules' full names (``down_blocks.0....attn1.to_q``), in layout order."""
    names: list[str] = []
    for key in layout.keys:
        name = lora_key(key).rsplit(".", 2)[0]
        if name not in names:
            names.append(name)
    return names


def peft_state_dict(weights: torch.Tensor | np.ndarray, layout: Layout) -> dict[str, torch.Tensor]:
    """peft's keys for one row, float32, A and B unscaled (peft applies ``lora_alpha / r`` itself)."""
    _modules(layout)  # refuses a non-LoRA layout
    return {f"{PEFT_PREFIX}{k}": t.float().contiguous() for k, t in layout.unflatten(weights).items()}


def peft_config(layout: Layout, hparams: dict, base: str | None = None) -> dict:
    """``adapter_config.json`` as peft writes it: r = rank, lora_alpha = alpha, the exact target modules, and
    ``base_model_name_or_path`` = ``base`` (``base_name``)."""
    from peft import LoraConfig

    config = LoraConfig(
        base_model_name_or_path=base,
        r=int(hparams["rank"]),
        lora_alpha=float(hparams["alpha"]),
        target_modules=_modules(layout),  # full names: peft matches them exactly, nothing else is adapted
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    ).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _metadata(layout: Layout, hparams: dict, baked: float | None) -> dict[str, str]:
    out = {
        "format": "pt",
        "weightzoo.layout": layout.fingerprint,
        "weightzoo.hparams": json.dumps(hparams, sort_keys=True, default=str),
    }
    if baked is not None:
        out[BAKED_SCALE] = repr(baked)
    return out


def export_peft(weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict, out_dir: str,
                base: str | None = None) -> str:
    """Write one row as a peft adapter folder (any fsspec URI) naming ``base`` as its base; returns the folder's URI."""
    if str(out_dir).endswith(".safetensors"):
        raise InputError(f"--format peft writes a folder (adapter_config.json + {PEFT_WEIGHT_NAME}), not {out_dir}")
    fs, root = filesystem(str(out_dir))
    data = safetensors.torch.save(peft_state_dict(weights, layout), metadata=_metadata(layout, hparams, None))
    write_bytes(fs, join(root, PEFT_WEIGHT_NAME), data)
    config = json.dumps(peft_config(layout, hparams, base), indent=2, sort_keys=True, default=str)
    write_bytes(fs, join(root, PEFT_CONFIG_NAME), config.encode())  # last: a folder with a config is complete
    return str(out_dir)


def _refuse_file_as_folder(out: str, fmt: str) -> None:
    """An existing file where a folder is to be written: one line, not a NotADirectoryError from deep in a write."""
    fs, path = filesystem(str(out))
    if not str(out).endswith(".safetensors") and fs.isfile(path):
        raise InputError(f"--out {out} is an existing file; --format {fmt} writes a folder there "
                         "(or give a path ending in .safetensors)")


def export(weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict, out: str, fmt: str = "diffusers",
           base: str | None = None) -> str:
    """Write one row in ``fmt`` (``diffusers``: a .safetensors file or folder; ``peft``: a folder naming ``base``).

    A row of a recipe outside the LoRA family is written by that recipe (its documented loader)."""
    from weightzoo.tasks.identity import recipes

    method = str(hparams.get("method", "lora"))
    if method in recipes.NAMES and not recipes.NAMES[method].lora_family:
        recipe = recipes.get(method)
        if fmt != "diffusers":
            raise InputError(f"--format {fmt} is for LoRA rows; a {recipe.name} row exports as its own file (diffusers)")
        return recipe.export(weights, layout, hparams, out)
    _refuse_file_as_folder(out, fmt)
    if fmt == "diffusers":
        return export_lora(weights, layout, hparams, out)
    if fmt == "peft":
        return export_peft(weights, layout, hparams, out, base)
    raise InputError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def export_lora(weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict, out_path: str) -> str:
    """Write one row as a diffusers LoRA; returns the file's URI.

    ``out_path`` is the ``.safetensors`` file to write, or a folder (any fsspec URI) to hold
    ``pytorch_lora_weights.safetensors``. The resolved hyperparameters and the layout fingerprint go
    into the file's metadata, so an exported file says how it was made.
    """
    path = out_path if str(out_path).endswith(".safetensors") else join(str(out_path), WEIGHT_NAME)
    metadata = _metadata(layout, hparams, float(hparams["alpha"]) / float(hparams["rank"]))
    data = safetensors.torch.save(lora_state_dict(weights, layout, hparams), metadata=metadata)
    fs, fs_path = filesystem(path)
    write_bytes(fs, fs_path, data)
    return path


def merged_state_dict(rows: Sequence[tuple[torch.Tensor | np.ndarray, dict]], layout: Layout,
                      scales: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Rows (weights, hparams) of one LoRA layout as one diffusers state dict of rank Σr: ΔW = Σ s_i (α_i/r_i) B_i A_i."""
    if not rows:
        raise InputError("nothing to merge: no rows given")
    scales = [1.0] * len(rows) if scales is None else list(scales)
    if len(scales) != len(rows):
        raise InputError(f"{len(scales)} scales for {len(rows)} rows")
    dicts = [lora_state_dict(w, layout, h) for w, h in rows]  # alpha/rank baked into each B already
    prefixes = {key_prefix(h) for _, h in rows}
    if len(prefixes) > 1:
        raise InputError(f"rows of different model families cannot be merged ({', '.join(sorted(prefixes))})")
    prefix = prefixes.pop()
    out: dict[str, torch.Tensor] = {}
    for name in _modules(layout):
        a, b = f"{prefix}.{name}{LORA_A}", f"{prefix}.{name}{LORA_B}"
        out[a] = torch.cat([d[a] for d in dicts], 0).contiguous()
        out[b] = torch.cat([s * d[b] for s, d in zip(scales, dicts, strict=True)], 1).contiguous()
    return out


def export_merged(rows: Sequence[tuple[torch.Tensor | np.ndarray, dict]], layout: Layout, out_path: str,
                  scales: Sequence[float] | None = None, ids: Sequence[str] = ()) -> str:
    """Write the merge of ``rows`` as one diffusers LoRA (a .safetensors file or a folder); returns its URI."""
    path = out_path if str(out_path).endswith(".safetensors") else join(str(out_path), WEIGHT_NAME)
    metadata = {
        "format": "pt",
        "weightzoo.layout": layout.fingerprint,
        "weightzoo.merged_ids": json.dumps(list(ids)),
        "weightzoo.merged_methods": json.dumps(sorted({str(h.get("method")) for _, h in rows})),
        BAKED_SCALE: "alpha/rank of each row, times its merge scale",
    }
    data = safetensors.torch.save(merged_state_dict(rows, layout, scales), metadata=metadata)
    fs, fs_path = filesystem(path)
    write_bytes(fs, fs_path, data)
    return path
