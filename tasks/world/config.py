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


# DreamBooth-LoRA settings that teach a world identity in seconds on a CPU (w2w's rank 1, to_q/to_v): a higher
# learning rate and fewer steps than SD 1.5's 1e-4 x 800, for a base 1000x smaller (6e-3 read back better
# than 2e-3 at 150 or 400 steps on four identities). 20 DPM-Solver steps at guidance 4 draw flat shapes.
SAMPLE_STEPS = 20
GUIDANCE = 4.0
WORLD_FINETUNE: dict = {"steps": 150, "learning_rate": 6e-3, "resolution": 32, "num_class_images": 32,
                        "class_inference_steps": SAMPLE_STEPS, "class_guidance_scale": GUIDANCE}
