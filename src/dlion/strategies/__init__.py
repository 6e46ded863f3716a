"""The registry of training strategies: one file per algorithm, registered here by name."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from dlion.context import WorkerContext
from dlion.errors import ConfigError
from dlion.strategies import adpsgd, ako, allreduce, dlion, gaia, hop, ps


@dataclass(frozen=True)
class StrategySpec:
    name: str
    summary: str
    options_model: type[BaseModel]
    worker: Callable[[WorkerContext, Any], Awaitable[None]]


REGISTRY: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec("allreduce", allreduce.SUMMARY, allreduce.Options, allreduce.worker),
        StrategySpec("dlion", dlion.SUMMARY, dlion.Options, dlion.worker),
        StrategySpec("gaia", gaia.SUMMARY, gaia.Options, gaia.worker),
        StrategySpec("ako", ako.SUMMARY, ako.Options, ako.worker),
        StrategySpec("hop", hop.SUMMARY, hop.Options, hop.worker),
        StrategySpec("ps-bsp", ps.BSP_SUMMARY, ps.Options, ps.bsp_worker),
        StrategySpec("ps-asp", ps.ASP_SUMMARY, ps.AspOptions, ps.asp_worker),
        StrategySpec("adpsgd", adpsgd.SUMMARY, adpsgd.Options, adpsgd.worker),
    )
}


def get_strategy(name: str) -> StrategySpec:
    if name not in REGISTRY:
        known = ", ".join(REGISTRY)
        raise ConfigError(f"strategy.name: unknown strategy {name!r} (choose from {known})")
    return REGISTRY[name]


def parse_options(spec: StrategySpec, options: dict[str, Any]) -> BaseModel:
    """Validate `strategy.options` against the strategy's own model; errors name the field."""
    try:
        return spec.options_model.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"strategy.options.{loc}: {msg} (strategy {spec.name})") from None
