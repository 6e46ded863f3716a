"""The part of the hybrid config that names a model (edge or cloud): shared by the config
(which checks the name resolves) and the model registry (which builds it), so neither
imports the other."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    """An edge or cloud classifier: a registered name (`mlp`, `cnn`, or `module:function`)."""

    name: str = Field("mlp", description="Registered model name, or 'package.module:builder'.")
    hidden: list[int] = Field(
        default_factory=lambda: [32], min_length=1, description="Dense hidden widths."
    )
    channels: list[int] = Field(
        default_factory=lambda: [16, 32], min_length=1, description="cnn: conv channels."
    )
    downsample: int = Field(
        1,
        ge=1,
        description="Average-pool the input by this factor per spatial axis before the "
        "model (1 = full resolution); part of the model, so its FLOPs are counted.",
    )
