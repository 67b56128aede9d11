"""A concept row back into a working editor: merged into a copy of the base, or an exported adapter loaded by peft.

Export is the generic ``tasks/finetune/export.export(..., fmt="peft")``: the row's factors already have
peft's conv-LoRA keys and shapes, so ``PeftModel.from_pretrained(base, folder)`` loads it onto a
``SkipUNetGenerator`` with no weightzoo code involved, and reproduces the edit.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from weightzoo.storage.layout import Layout
from weightzoo.tasks.concepts.base import SkipUNetGenerator, load_base
from weightzoo.tasks.concepts.lora import merge


def merged(base: SkipUNetGenerator, weights: torch.Tensor | np.ndarray, layout: Layout, hparams: dict) -> SkipUNetGenerator:
    """A copy of ``base`` with one row's adapter merged into its convs (exact: conv LoRA is linear in the kernel)."""
    model = copy.deepcopy(base)
    merge(model, layout.unflatten(layout.as_tensor(weights)), float(hparams["alpha"]) / float(hparams["rank"]))
    return model.eval()


def load_peft_adapter(base_uri: str, folder: str) -> torch.nn.Module:
    """The base at ``base_uri`` with the peft adapter folder ``folder`` (from ``export --format peft``) on it."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_uri), folder).eval()
