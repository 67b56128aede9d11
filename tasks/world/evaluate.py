"""How well a world base draws what it is told: reader-scored accuracy of prompt → picture, per attribute."""

from __future__ import annotations

import random

import numpy as np
from diffusers import StableDiffusionPipeline

from weightzoo.tasks.world.identities import generate
from weightzoo.tasks.world.render import ATTRIBUTES, caption, read


def prompt_reads(pipe: StableDiffusionPipeline, n: int = 32, seed: int = 0, steps: int = 20,
                 guidance: float = 4.0) -> list[tuple[dict[str, str], dict[str, str]]]:
    """``n`` fully specified prompts with random labels, one picture each: (asked, read) label pairs."""
    rng = random.Random(f"world-eval:{seed}")
    labels = [{a: rng.choice(v) for a, v in ATTRIBUTES.items()} for _ in range(n)]
    return [(lab, read(generate(pipe, caption(lab), 1, seed=seed + i, steps=steps, guidance=guidance)[0]))
            for i, lab in enumerate(labels)]


def prompt_accuracy(pipe: StableDiffusionPipeline, n: int = 32, seed: int = 0, steps: int = 20,
                    guidance: float = 4.0) -> dict[str, float]:
    """The share of ``prompt_reads``' pictures whose reader label matches the prompt, per attribute and for
    all attributes at once ("all")."""
    return read_accuracy(prompt_reads(pipe, n, seed, steps, guidance))


def read_accuracy(pairs: list[tuple[dict[str, str], dict[str, str]]]) -> dict[str, float]:
    """Per attribute, and for all at once ("all"): the share of (asked, read) pairs that agree."""
    out = {a: float(np.mean([got[a] == want[a] for want, got in pairs])) for a in ATTRIBUTES}
    out["all"] = float(np.mean([got == want for want, got in pairs]))
    return out
