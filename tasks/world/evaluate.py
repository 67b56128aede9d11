"""How well a world base draws what it is told: reader-scored accuracy of prompt → picture, per attribute."""

from __future__ import annotations

import random

import numpy as np
from diffusers import StableDiffusionPipeline

from weightzoo.tasks.world.identities import generate
from weightzoo.tasks.world.render import ATTRIBUTES, caption, read


def prompt_accuracy(pipe: StableDiffusionPipeline, n: int = 32, seed: int = 0, steps: int = 20,
                    guidance: float = 4.0) -> dict[str, float]:
    """Sample ``n`` fully specified prompts with random labels, one picture each, and return the share of
    pictures whose reader label matches the prompt, per attribute and for all attributes at once ("all")."""
    rng = random.Random(f"world-eval:{seed}")
    labels = [{a: rng.choice(v) for a, v in ATTRIBUTES.items()} for _ in range(n)]
    got = [read(generate(pipe, caption(lab), 1, seed=seed + i, steps=steps, guidance=guidance)[0])
           for i, lab in enumerate(labels)]
    out = {a: float(np.mean([g[a] == lab[a] for g, lab in zip(got, labels, strict=True)])) for a in ATTRIBUTES}
    out["all"] = float(np.mean([g == lab for g, lab in zip(got, labels, strict=True)]))
    return out
