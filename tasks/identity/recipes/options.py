"""The recipes' options models (``FinetuneConfig.recipe_options``), apart from the recipes' torch code.

``FinetuneConfig`` validates its ``recipe_options`` with these, and the CLI builds its flags from
``FinetuneConfig``: so this module imports pydantic only, and ``weightzoo build --help`` stays fast.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class NoRecipeConfig(BaseModel):
    """A recipe without options of its own (``FinetuneConfig.recipe_options`` must stay empty)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class CelebBasisConfig(BaseModel):
    """``recipe_options`` of ``celeb_basis``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    names: str | None = Field(None, description="Names file URI (one 'First Last' per line); None: the shipped list.")
    words: int = Field(2, ge=1, description="Learned words per identity (first and last name in the paper).")
    basis_size: int = Field(512, ge=1, description="Basis directions per word; a row has words x basis_size values.")
    placeholder: str = Field("sks", min_length=1, pattern=r"^\w+$",
                             description="The instance-prompt word the learned words replace; the export's token is <placeholder>.")


class PerfusionConfig(BaseModel):
    """``recipe_options`` of ``perfusion``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    placeholder: str = Field("sks", min_length=1, pattern=r"^\w+$",
                             description="The instance-prompt word the concept replaces; the export's token is <placeholder>.")
    temperature: float = Field(0.1, gt=0, description="Gate temperature τ (training and inference).")
    bias: float = Field(0.75, description="Gate bias β: how close to i* (in C⁻¹ projection) an input must be to open the gate.")
    names: str | None = Field(None, description="Names file URI for the covariance corpus; None: the shipped list.")
