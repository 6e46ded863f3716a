"""Federated learning: server and client behaviours, algorithms registered by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from dlion.errors import ConfigError
from dlion.fl import ca2fl, fadas, fedasmu, fedasync, fedavg, fedbuff, fedcompass, fedpace
from dlion.fl.base import Algorithm


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    summary: str
    options_model: type[BaseModel]
    factory: Callable[[Any, int], Algorithm]
    fixed: dict[str, Any] = field(default_factory=dict)  # options a variant pins (ablations)


ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in (
        AlgorithmSpec("fedavg", fedavg.SUMMARY, fedavg.Options, fedavg.FedAvg),
        AlgorithmSpec("fedasync", fedasync.SUMMARY, fedasync.Options, fedasync.FedAsync),
        AlgorithmSpec("fedbuff", fedbuff.SUMMARY, fedbuff.Options, fedbuff.FedBuff),
        AlgorithmSpec("fedasmu", fedasmu.SUMMARY, fedasmu.Options, fedasmu.FedASMU),
        AlgorithmSpec(
            "fedasmu-noserver",
            "fedasmu ablation: static staleness weight instead of the dynamic aggregation",
            fedasmu.Options,
            fedasmu.FedASMU,
            {"server": False},
        ),
        AlgorithmSpec(
            "fedasmu-nodevice",
            "fedasmu ablation: no adaptive local model adjustment on the device",
            fedasmu.Options,
            fedasmu.FedASMU,
            {"device": False},
        ),
        AlgorithmSpec("ca2fl", ca2fl.SUMMARY, ca2fl.Options, ca2fl.CA2FL),
        AlgorithmSpec("fedcompass", fedcompass.SUMMARY, fedcompass.Options, fedcompass.FedCompass),
        AlgorithmSpec("fadas", fadas.SUMMARY, fadas.Options, fadas.FADAS),
        AlgorithmSpec("fedpace", fedpace.SUMMARY, fedpace.Options, fedpace.FedPace),
        *(
            AlgorithmSpec(
                f"fedpace-{suffix}",
                f"fedpace ablation: {what}",
                fedpace.Options,
                fedpace.FedPace,
                fixed,
            )
            for suffix, what, fixed in fedpace.ABLATIONS
        ),
    )
}


def build_algorithm(
    name: str, options: dict[str, Any], num_clients: int, concurrency: int = 1
) -> Algorithm:
    """The algorithm `name` with validated options; errors name the field. `concurrency`
    (clients training at once) is the unit of FedPace's staleness in rounds."""
    if name not in ALGORITHMS:
        known = ", ".join(ALGORITHMS)
        raise ConfigError(f"algorithm.name: unknown FL algorithm {name!r} (choose from {known})")
    spec = ALGORITHMS[name]
    clash = sorted(k for k in spec.fixed if k in options and options[k] != spec.fixed[k])
    if clash:
        raise ConfigError(
            f"algorithm.options.{clash[0]}: {name} fixes it to {spec.fixed[clash[0]]}"
        )
    try:
        parsed = spec.options_model.model_validate({**options, **spec.fixed})
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"algorithm.options.{loc}: {msg} (algorithm {name})") from None
    algo = spec.factory(parsed, num_clients)
    algo.concurrency = concurrency
    return algo
