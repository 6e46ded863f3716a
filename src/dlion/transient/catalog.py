"""Instance catalog: compute capacity, prices and revocation model per instance type (YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dlion.core.config import (
    format_validation_error,
    parse_yaml_mapping,
    read_source,
    shipped_names,
)
from dlion.core.errors import ConfigError

Tier = Literal["transient", "on-demand"]
TIERS: tuple[Tier, ...] = ("transient", "on-demand")
_FOLDER = "transient_catalogs"  # the shipped catalogs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Revocation(_Strict):
    """How long a transient instance lives before the provider takes it back."""

    distribution: Literal["exponential", "weibull", "none"] = Field(
        description="Lifetime law: exponential (memoryless), weibull (shape < 1: high early "
        "hazard, as measured for GCP preemptible VMs), none (never revoked)."
    )
    mean_lifetime_h: float | None = Field(None, gt=0, description="exponential: mean in hours.")
    shape: float | None = Field(None, gt=0, description="weibull: shape k.")
    scale_h: float | None = Field(None, gt=0, description="weibull: scale in hours.")
    max_lifetime_h: float | None = Field(
        None, gt=0, description="Revoked at this age at the latest (GCP preemptible: 24 h)."
    )
    warning_s: float = Field(
        0.0, ge=0, description="Notice before the revocation, in which a worker may checkpoint."
    )

    @model_validator(mode="after")
    def _parameters(self) -> Revocation:
        if self.distribution == "exponential" and self.mean_lifetime_h is None:
            raise ValueError("exponential: give mean_lifetime_h")
        if self.distribution == "weibull" and (self.shape is None or self.scale_h is None):
            raise ValueError("weibull: give shape and scale_h")
        return self


class InstanceType(_Strict):
    name: str = Field(min_length=1, description="Name used on the command line.")
    provider: str = ""
    gpu: str = ""
    peak_gflops: float = Field(gt=0, description="Published peak FP32 GFLOP/s.")
    efficiency: float = Field(
        gt=0, le=1, description="Share of the peak a training step reaches (assumption)."
    )
    on_demand_per_h: float = Field(ge=0, description="USD per hour, on-demand.")
    transient_per_h: float = Field(ge=0, description="USD per hour, transient (spot/preemptible).")
    startup_s: float = Field(ge=0, description="Seconds from request until a worker is ready.")
    revocation: Revocation
    sources: dict[str, str] = Field(default_factory=dict, description="Field -> citation.")

    @property
    def capacity_gflops(self) -> float:
        """Effective training throughput, GFLOP/s."""
        return self.peak_gflops * self.efficiency

    def price_per_h(self, tier: Tier) -> float:
        return self.transient_per_h if tier == "transient" else self.on_demand_per_h


class Catalog(_Strict):
    name: str = "catalog"
    description: str = ""
    instances: list[InstanceType] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Catalog:
        names = [i.name for i in self.instances]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"instances.{i}.name: duplicate instance type {name!r}")
        return self

    def get(self, name: str) -> InstanceType:
        for inst in self.instances:
            if inst.name == name:
                return inst
        known = ", ".join(i.name for i in self.instances)
        raise ConfigError(f"unknown instance type {name!r} in catalog {self.name} ({known})")


def shipped_catalogs() -> list[str]:
    return shipped_names(_FOLDER)


def load_catalog(source: str | Path = "default") -> Catalog:
    """A catalog from a YAML path or a shipped catalog name; one-line ConfigError otherwise."""
    text_source = str(source)
    raw = parse_yaml_mapping(read_source(text_source, _FOLDER, "catalog", "catalog"), text_source)
    try:
        return Catalog.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{text_source}: {format_validation_error(err)}") from None
