"""The world base's build settings, free of torch so the CLI's ``--help`` states them without loading it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

VERSION = 2  # of the world and its training recipe: a base cached by an older version is not reused


@dataclass(frozen=True)
class WorldBaseSettings:
    """Everything a world base is made from: the same settings give the same files (one machine, one thread count)."""

    seed: int = 0
    steps: int = 4000  # UNet + text encoder steps
    vae_steps: int = 1200
    pool: int = 2048  # captioned renders the base learns from

    def name(self) -> str:
        """The folder name ``build_world_base`` keeps a base with these settings under."""
        return f"world-base-v{VERSION}-seed{self.seed}-steps{self.steps}-vae{self.vae_steps}-pool{self.pool}"

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# DreamBooth-LoRA settings that teach a world identity in seconds on a CPU (w2w's rank 1, alpha 27, to_q/to_v):
# a higher learning rate and fewer steps than SD 1.5's 1e-4 x 800, for a base 1000x smaller. On the
# 4,000-step base, 8 identities of draw 1 read back 0.75 of their attributes at 1e-3 x 300 steps, against
# 0.61 at 6e-3 x 150 and 0.59 at 2e-3 x 150 (docs/BENCHMARKS.md "Identity world"). No prior preservation:
# on validation draw 2 (16 identities, bench/world_recipe.py) it reads 0.89 against 0.83 with the prior loss
# (whose class images are the base's own, weak shapes), at 2.2x less time; the identity world bench with it
# (both seeds, "Run 5") lifts the ceiling to 0.875 and meets the generator goal on both, at a cost in sample
# validity. 20 DPM-Solver steps at guidance 4.
SAMPLE_STEPS = 20
GUIDANCE = 4.0
# The class-image settings stay for a recipe that turns the prior back on (bench/identity_world.py --prior).
WORLD_FINETUNE: dict = {"steps": 300, "learning_rate": 1e-3, "resolution": 32, "prior_preservation": False,
                        "num_class_images": 32, "class_inference_steps": SAMPLE_STEPS, "class_guidance_scale": GUIDANCE}
