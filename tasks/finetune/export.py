"""Export a dataset row as a diffusers LoRA file (``pytorch_lora_weights.safetensors``).

A row holds the adapters exactly as trained (A, B, no scaling). The file holds peft/diffusers keys
(``unet.<module>.lora_A.weight``, ``...lora_B.weight``) with the ``alpha / rank`` scale baked into
``lora_B``: diffusers loads a peft-format file without alphas at scale 1, so baking is what makes
``pipe.load_lora_weights(path)`` reproduce the trained model in any diffusers version and any other
tool reading the same format. Tensors are written as float32 so baking adds no rounding. Safetensors
only: a weights file is never a pickle.
"""

from __future__ import annotations

import json

import numpy as np
import safetensors.torch
import torch

from weightzoo.storage.fs import filesystem, join, write_bytes
from weightzoo.storage.layout import Layout

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def lora_state_dict(weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict) -> dict[str, torch.Tensor]:
    """The diffusers-format state dict of one row: ``unet.``-prefixed keys, float32, scale baked into B."""
    scale = float(hparams["alpha"]) / float(hparams["rank"])
    out: dict[str, torch.Tensor] = {}
    for key, tensor in layout.unflatten(weights).items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{key!r} is not a LoRA key (…lora_A.weight / …lora_B.weight); not a LoRA layout")
        t = tensor.float()
        out[f"unet.{key}"] = (t * scale if key.endswith(".lora_B.weight") else t).contiguous()
    return out


def export_lora(weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict, out_path: str) -> str:
    """Write one row as a diffusers LoRA; returns the file's URI.

    ``out_path`` is the ``.safetensors`` file to write, or a folder (any fsspec URI) to hold
    ``pytorch_lora_weights.safetensors``. The resolved hyperparameters and the layout fingerprint go
    into the file's metadata, so an exported file says how it was made.
    """
    path = out_path if str(out_path).endswith(".safetensors") else join(str(out_path), WEIGHT_NAME)
    metadata = {
        "format": "pt",
        "weightzoo.layout": layout.fingerprint,
        "weightzoo.scale_baked_into_lora_B": repr(float(hparams["alpha"]) / float(hparams["rank"])),
        "weightzoo.hparams": json.dumps(hparams, sort_keys=True, default=str),
    }
    data = safetensors.torch.save(lora_state_dict(weights, layout, hparams), metadata=metadata)
    fs, fs_path = filesystem(path)
    write_bytes(fs, fs_path, data)
    return path
