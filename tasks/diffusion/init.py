"""``weightzoo init``: the best start the project knows for a new concept, as a LoRA file a build starts from.

A weight generator's model folder offers two starts for a condition: the **generated** row (the denoiser's
one-step output; for a residual model, its retrieval plus the learnt correction) and, for a residual model
(``residual_k`` > 0), the **retrieved** one (the k nearest training rows by condition, inverse-distance
weighted). ``auto`` takes what the benches measured to fine-tune fastest. The file is a diffusers LoRA
(``WeightDiffusionModel.export``): it loads into a pipeline as it is, and a manifest row's ``init`` starts that row's
training from it (``tasks/finetune/starts.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from weightzoo.errors import InputError

Start = Literal["auto", "generated", "retrieved"]
# What fine-tunes fastest, measured (docs/BENCHMARKS.md "Concept zoo", issue #24, two draws of 32 held-out
# edit concepts): the 4-nearest retrieval needs fewer median steps to the target than the generated row on
# the second draw (75 against 92.5) and nearly as few on the first (120 against 112.5), and the generated
# row needs strictly fewer steps than it on only 29-31 % of concepts. A model without retrieval generates.
BEST: Literal["generated", "retrieved"] = "retrieved"


def choose(start: Start, has_retrieval: bool) -> Literal["generated", "retrieved"]:
    """The start ``auto`` stands for on a model with or without retrieval; ``retrieved`` needs retrieval."""
    if start == "auto":
        return BEST if has_retrieval else "generated"
    if start == "retrieved" and not has_retrieval:
        raise InputError("--start retrieved needs a residual generator (residual_k > 0); this model only generates")
    return start


def write_start(model_uri: str, prompt: str, out: str, attributes: Mapping[str, str] | None = None,
                start: Start = "auto", seed: int = 0) -> tuple[str, str]:
    """Write the start for ``prompt`` (+ ``attributes``) as a diffusers LoRA at ``out``; returns (file, start used)."""
    from weightzoo.tasks.diffusion.generator import WeightDiffusionModel

    model = WeightDiffusionModel.load(model_uri)
    how = choose(start, model.retrieval is not None)
    text = model.text(prompt, attributes)
    vector = (model.retrieve([text]) if how == "retrieved" else model.generate([text], seed=seed))[0]
    return model.export(vector, out), how
