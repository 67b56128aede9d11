"""``SubspaceConfig``: how to fit a subspace (saved in its ``card.json``), and the applications' defaults.

Its own module, free of torch: the CLI builds ``fit-subspace``'s flags from it and the flows' config
names it, without importing the fit (``pca.py``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The applications' defaults (tasks/subspace/w2w.py), chosen on a validation draw of 256 world identities (draw 3,
# neither seed of bench/identity_world.py; docs/BENCHMARKS.md "Identity world", run 6):
# - sample: 32 samples x 2 pictures held a readable subject 0.67 of the time at 1.0 (w2w's draw), 0.80 at 0.7,
#   0.78 at 0.5.
SAMPLE_TEMPERATURE = 0.7
# - edit --direction labels (16 identities x 5 attributes x 2 pictures a point): accuracy / preservation 0.34 /
#   0.83 at 1, 0.61 / 0.79 at 1.5, 0.65 / 0.72 at 2, 0.69 / 0.63 at 3; 1.5 has the best sum, and for three
#   attributes of five on their own (the other two within the noise, ±0.08).
EDIT_STRENGTH = 1.5
# - edit --direction probe, in dataset std along the probe's unit direction: runs 3-5, where the gain flattens.
PROBE_STRENGTH = 4.0


def default_strength(direction: str) -> float:
    """``weightzoo edit``'s strength for ``--direction`` labels or probe (their units differ)."""
    return EDIT_STRENGTH if direction == "labels" else PROBE_STRENGTH


class SubspaceConfig(BaseModel):
    """How to fit the subspace (saved in ``card.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    components: int = Field(64, ge=1, description="Principal components k to keep.")
    # Krylov space width (q + 1)·b = 3k by default: weight spectra decay slowly, so the Ritz problem
    # needs room beyond k (the 'oversampling' of a block Krylov method). q = 5 rather than 4 costs one
    # more pass for a much smaller captured-variance gap (docs/BENCHMARKS.md, "Figures behind defaults").
    block_size: int | None = Field(
        None, ge=1, description="Columns b per Krylov block (one pass each); default ⌈k/2⌉.")
    power_iters: int = Field(
        5, ge=0, description="Krylov blocks q after the first: q + 1 passes over the data, width (q + 1)·b.")
    device: str = Field("auto", description="'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    # float32 matmuls with float32 accumulators; moments and the Ritz problem are float64.
    dtype: Literal["float32", "float64"] = Field("float32", description="Compute dtype of the matmuls.")
    seed: int = Field(0, ge=0, description="Seed of the Gaussian start block Ω.")
    keep_work: bool = Field(False, description="Keep the work files (partials, bases) after the fit.")
    # Each task writes one D×b partial per pass (200 MB at weights2weights' D and k = 1,000): group
    # the shards, so thousands of shards do not mean thousands of partials.
    tasks_per_pass: int = Field(8, ge=1, description="Shard groups per pass: parallel tasks, one partial file each.")

    @model_validator(mode="after")
    def _wide_enough(self) -> SubspaceConfig:
        if self.width < self.components:
            raise ValueError(f"the Krylov width (power_iters + 1) · block_size = {self.width} is below "
                             f"components = {self.components}")
        return self

    @property
    def block(self) -> int:
        return self.block_size or -(-self.components // 2)

    @property
    def width(self) -> int:
        """Columns of the Krylov basis K: the size of the Rayleigh–Ritz problem."""
        return (self.power_iters + 1) * self.block
