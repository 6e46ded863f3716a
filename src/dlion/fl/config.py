"""Typed config of a federated job (`kind: fl`): clients, server, algorithm, local training.

An FL config is a YAML file whose top level has `kind: fl`; `dlion train` sees that key
and runs the federated engine instead of the data-parallel one. It reuses the data and
model sections of experiment configs; `extends:` and `--set a.b=v` work as there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from dlion.core.config import (
    CheckpointConfig,
    DatasetSource,
    JobEngineConfig,
    ModelConfig,
    _Strict,
    apply_overrides,
    parse_yaml_mapping,
    read_config_source,
    read_text_file,
    shipped_names,
    validated,
)
from dlion.core.errors import ConfigError
from dlion.core.registry import check_fl_options

FL_PRESETS = "fl/scenarios"  # shipped FL configs, inside the dlion package


class Range(_Strict):
    """A per-client quantity drawn log-uniformly in [min, max] (seeded)."""

    min: float = Field(gt=0)
    max: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class AvailabilityConfig(_Strict):
    """Alternating online/offline periods with exponential lengths, per client (seeded)."""

    mean_online_s: float = Field(
        120.0, gt=0, description="Mean length of an online period (virtual s)."
    )
    mean_offline_s: float = Field(
        0.0, ge=0, description="Mean length of an offline period; 0 = always online."
    )


class ClientsConfig(_Strict):
    count: int = Field(100, ge=1, description="Number of clients (devices).")
    concurrency: int = Field(
        10, ge=1, description="Clients training at once (async: kept busy; fedavg: per round)."
    )
    compute_gflops: Range = Field(
        default_factory=lambda: Range(min=0.01, max=0.2),
        description="Effective training GFLOP/s per client, log-uniform: a 20x spread "
        "between the slowest and fastest device is what makes updates stale.",
    )
    bandwidth_mbps: Range = Field(
        default_factory=lambda: Range(min=2.0, max=50.0),
        description="Client <-> server link bandwidth (Mbit/s, both directions).",
    )
    latency_ms: float = Field(20.0, ge=0, description="One-way client <-> server latency.")
    availability: AvailabilityConfig = Field(default_factory=AvailabilityConfig)


class ServerConfig(_Strict):
    nic_mbps: float = Field(
        1000.0, gt=0, description="Server NIC, shared by all concurrent transfers."
    )
    probe_samples: int = Field(
        200,
        ge=1,
        description="(spec) Size of the server's proxy set, drawn from the training data, "
        "on which fedasmu observes the loss change of each merge. Costs no virtual time.",
    )
    task_timeout_s: float = Field(
        600.0, gt=0, description="A task with no upload after this long is abandoned."
    )


class LocalConfig(_Strict):
    """Local training on a device: plain SGD from the model the server sent."""

    epochs: float = Field(1.0, gt=0, description="Passes over the client's data per task.")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class FLDataConfig(DatasetSource):
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (label skew).")
    shards_per_client: int = Field(
        2, ge=1, description="shards: mean label shards per client (counts vary per client)."
    )
    size_sigma: float = Field(
        0.5,
        ge=0,
        description="shards: lognormal sigma of per-client shard counts; 0 = equal counts.",
    )


class AlgorithmConfig(_Strict):
    name: str = Field("fedasmu", description="Registered FL algorithm (`dlion fl algorithms`).")
    options: dict[str, Any] = Field(default_factory=dict, description="Algorithm options.")


class SecurityConfig(_Strict):
    """What the server does with client updates it cannot trust."""

    norm_multiple: float = Field(
        10.0,
        gt=1,
        description="An update whose L2 norm exceeds this multiple of the median of recent "
        "accepted norms is clipped or rejected; 10x leaves honest non-IID spread alone.",
    )
    norm_action: Literal["clip", "reject"] = "clip"
    norm_history: int = Field(50, ge=1, description="Accepted norms kept for the median.")
    norm_warmup: int = Field(
        5, ge=1, description="Norm screening starts after this many accepted updates."
    )


class FLTrainConfig(_Strict):
    seed: int = Field(0, ge=0)
    target_acc: float = Field(0.9, gt=0, le=1, description="Global model accuracy to reach.")
    max_time: float = Field(300.0, gt=0, description="Stop after this many virtual seconds.")
    stop_at_target: bool = True


class FLEvaluationConfig(_Strict):
    every_s: float = Field(5.0, gt=0, description="Evaluate the global model this often.")
    max_test_samples: int | None = Field(None, ge=1)


class FLEngineConfig(JobEngineConfig):
    # dist only (fl/processes.py: one server process, one process per client, gloo on CPU)
    heartbeat_s: float = Field(0.2, gt=0, description="dist: heartbeat period (wall s).")
    peer_timeout: float = Field(
        5.0,
        gt=0,
        description="dist: a client whose heartbeat is older than this (wall s) is gone; a "
        "killed process is usually noticed sooner, by its broken link.",
    )


class FLConfig(_Strict):
    kind: Literal["fl"] = "fl"
    name: str = "fl"
    description: str = ""
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    data: FLDataConfig = Field(default_factory=FLDataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    train: FLTrainConfig = Field(default_factory=FLTrainConfig)
    evaluation: FLEvaluationConfig = Field(default_factory=FLEvaluationConfig)
    engine: FLEngineConfig = Field(default_factory=FLEngineConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _concurrency_fits(self) -> FLConfig:
        if self.clients.concurrency > self.clients.count:
            raise ValueError(
                f"clients.concurrency: {self.clients.concurrency} exceeds clients.count "
                f"({self.clients.count})"
            )
        return self


# ----------------------------------------------------------------------------- loading


def fl_presets() -> list[str]:
    return shipped_names(FL_PRESETS)


def is_fl_source(source: str) -> bool:
    """Whether `source` (a YAML path or preset name) is an FL config (`kind: fl`)."""
    path = Path(source)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        return source in fl_presets()
    if not path.is_file():
        return False  # let the normal loader report the missing file
    try:
        raw = parse_yaml_mapping(read_text_file(path, "config"), source)
    except ConfigError:
        return False
    seen = {path.resolve()}
    while raw.get("kind") is None and isinstance(raw.get("extends"), str):
        parent = str(raw["extends"])
        if parent in fl_presets():
            return True
        candidate = path.parent / parent
        if not candidate.is_file() or candidate.resolve() in seen:
            return False  # the normal loader reports a missing parent or an extends cycle
        seen.add(candidate.resolve())
        path = candidate
        raw = parse_yaml_mapping(read_text_file(path, "config"), str(path))
    return raw.get("kind") == "fl"


def load_fl_config(source: str, overrides: list[str] | None = None) -> FLConfig:
    """Load and validate an FL config, the algorithm's options too (through the registry)."""
    raw, _ = read_config_source(source, FL_PRESETS, "FL config")
    raw = apply_overrides(raw, overrides or [])
    cfg = fl_config_from_dict(raw, source)
    check_fl_options(cfg.algorithm.name, cfg.algorithm.options)
    return cfg


def fl_config_from_dict(raw: dict[str, Any], origin: str = "config") -> FLConfig:
    if raw.get("kind", "fl") != "fl":
        raise ConfigError(f"{origin}: kind: expected 'fl', got {raw.get('kind')!r}")
    return validated(FLConfig, raw, origin)


def with_fl_changes(cfg: FLConfig, overrides: list[str]) -> FLConfig:
    return fl_config_from_dict(apply_overrides(cfg.model_dump(mode="json"), overrides), cfg.name)


def config_hash(cfg: FLConfig) -> str:
    """Identity of a job for checkpoints (and for clients joining a server): everything
    except how long to run, how often to evaluate and checkpoint, and the secret."""
    raw = cfg.model_dump(mode="json")
    raw["engine"].pop("secret")  # how processes prove membership, not what the job is
    raw["train"].pop("max_time")
    raw["train"].pop("stop_at_target")
    raw.pop("checkpoint")
    raw.pop("evaluation")
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
