"""The built-in training strategies, one file per algorithm, registered by name in
`dlion.core.registry` when this package is imported (the registry imports it on first lookup).
`register_strategy`, `get_strategy` and the rest are re-exported from the registry."""

from __future__ import annotations

from dlion.core.registry import (
    REGISTRY,
    StrategySpec,
    get_strategy,
    load_plugins,
    parse_options,
    register_builtin,
    register_strategy,
)
from dlion.strategies import (
    adpsgd,
    ako,
    allreduce,
    diloco,
    dlion,
    dlion_hpdc21,
    gaia,
    halos,
    hop,
    ps,
    sparseloco,
    streaming_diloco,
)

for _spec in (
    StrategySpec("allreduce", allreduce.SUMMARY, allreduce.Options, allreduce.worker),
    StrategySpec("dlion", dlion.SUMMARY, dlion.Options, dlion.worker),
    StrategySpec("dlion-hpdc21", dlion_hpdc21.SUMMARY, dlion_hpdc21.Options, dlion_hpdc21.worker),
    StrategySpec("gaia", gaia.SUMMARY, gaia.Options, gaia.worker),
    StrategySpec("ako", ako.SUMMARY, ako.Options, ako.worker),
    StrategySpec("hop", hop.SUMMARY, hop.Options, hop.worker),
    StrategySpec("ps-bsp", ps.BSP_SUMMARY, ps.Options, ps.bsp_worker),
    StrategySpec("ps-asp", ps.ASP_SUMMARY, ps.AspOptions, ps.asp_worker),
    StrategySpec("adpsgd", adpsgd.SUMMARY, adpsgd.Options, adpsgd.worker),
    StrategySpec("diloco", diloco.SUMMARY, diloco.Options, diloco.worker),
    StrategySpec(
        "streaming-diloco",
        streaming_diloco.SUMMARY,
        streaming_diloco.Options,
        streaming_diloco.worker,
    ),
    StrategySpec("halos", halos.SUMMARY, halos.Options, halos.worker),
    StrategySpec("sparseloco", sparseloco.SUMMARY, sparseloco.Options, sparseloco.worker),
):
    register_builtin(_spec)

__all__ = [
    "REGISTRY",
    "StrategySpec",
    "get_strategy",
    "load_plugins",
    "parse_options",
    "register_strategy",
]
