"""Federated learning: server and client behaviours, algorithms registered by name."""

from __future__ import annotations

from typing import Any

from dlion.core.registry import (
    FL_ALGORITHMS,
    AlgorithmSpec,
    get_fl_algorithm,
    parse_fl_options,
    register_fl_builtin,
)
from dlion.fl import ca2fl, fadas, fedasmu, fedasync, fedavg, fedbuff, fedcompass, fedpace
from dlion.fl.base import Algorithm

for _spec in (
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
):
    register_fl_builtin(_spec)

ALGORITHMS = FL_ALGORITHMS


def build_algorithm(
    name: str, options: dict[str, Any], num_clients: int, concurrency: int = 1
) -> Algorithm:
    """The algorithm `name` with validated options; errors name the field. `concurrency`
    (clients training at once) is the unit of FedPace's staleness in rounds."""
    spec = get_fl_algorithm(name)
    algo: Algorithm = spec.factory(parse_fl_options(spec, options), num_clients)
    algo.concurrency = concurrency
    return algo
