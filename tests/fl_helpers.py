"""Shared FL test helpers: a tiny federated config that runs in well under a second."""

from __future__ import annotations

from typing import Any

from dlion.fl.config import FLConfig, fl_config_from_dict


def tiny(**sections: Any) -> FLConfig:
    raw: dict[str, Any] = {
        "kind": "fl",
        "name": "tiny",
        "clients": {
            "count": 8,
            "concurrency": 3,
            "compute_gflops": {"min": 0.05, "max": 0.2},
            "bandwidth_mbps": {"min": 5, "max": 20},
            "availability": {"mean_online_s": 10, "mean_offline_s": 3},
        },
        "data": {"name": "digits", "partition": "dirichlet", "alpha": 0.5},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"max_time": 8, "target_acc": 0.5, "stop_at_target": False},
        # Half an epoch per task keeps each test run well under a second.
        "local": {"epochs": 0.5},
        "evaluation": {"every_s": 2},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return fl_config_from_dict(raw)
