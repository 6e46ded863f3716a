"""Build and run a sim experiment on a cluster of catalog instances with drawn revocations."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from dlion.core.config import ExperimentConfig, config_from_dict, with_membership
from dlion.engines.sim import RunResult, run_sim
from dlion.training.experiment import make_model, prepare
from dlion.training.models import count_parameters
from dlion.transient.catalog import InstanceType, Tier
from dlion.transient.cost import Billing, RankBilling, cost_fields
from dlion.transient.revocation import Timeline, draw_timeline, membership_events
from dlion.transient.spec import TransientSpec


@dataclass(frozen=True)
class Candidate:
    """A cluster to evaluate: `count` instances of one type, all in one tier."""

    instance: InstanceType
    count: int
    tier: Tier

    @property
    def label(self) -> str:
        return f"{self.count} x {self.instance.name} ({self.tier})"


def cluster_config(
    base: ExperimentConfig, inst: InstanceType, count: int, spec: TransientSpec
) -> ExperimentConfig:
    """`base` (data, model, strategy, train settings) on `count` workers of `inst` in one
    zone, without membership events. `train.lr` is set for the global batch, which grows
    with the worker count: it is scaled by `count` (linear scaling rule)."""
    raw = base.model_dump(mode="json")
    raw["cluster"] = {
        "sites": [
            {
                "name": "zone",
                "intra_bandwidth_mbps": spec.bandwidth_mbps,
                "intra_latency_ms": spec.latency_ms,
            }
        ],
        "workers": [
            {
                "site": "zone",
                "capacity_gflops": inst.capacity_gflops * spec.capacity_scale,
                "nic_mbps": spec.bandwidth_mbps,
                "count": count,
            }
        ],
        "links": [],
    }
    raw["dynamics"] = {}
    raw["train"]["lr"] = base.train.lr * count
    raw["name"] = f"{base.name}-{count}x{inst.name}"
    return config_from_dict(raw, raw["name"])


@functools.lru_cache(maxsize=16)
def _model_bytes(cfg_json: str) -> int:
    cfg = ExperimentConfig.model_validate_json(cfg_json)
    prep = prepare(cfg, 1)
    return 4 * count_parameters(
        make_model(cfg, prep.input_shape, prep.num_classes)
    )  # float32 parameters


def model_bytes(cfg: ExperimentConfig) -> int:
    """Bytes of the model's float32 parameters (what a checkpoint holds, optimizer aside)."""
    # Only data and model decide the size; key the cache on them so clusters share it.
    key = cfg.model_copy(update={"dynamics": cfg.dynamics.__class__(), "name": "model"})
    return _model_bytes(key.model_dump_json())


def revocations_announced(inst: InstanceType, spec: TransientSpec, nbytes: int) -> bool:
    """A revoked worker leaves in order (checkpoint saved, peers told) when the notice is
    long enough to write its checkpoint; otherwise it simply vanishes (a crash)."""
    warning = spec.warning_s if spec.warning_s is not None else inst.revocation.warning_s
    return warning >= spec.checkpoint_s(nbytes)


def transient_config(
    base: ExperimentConfig, cand: Candidate, spec: TransientSpec, seed: int
) -> tuple[ExperimentConfig, Billing, Timeline]:
    """The sim config of one seeded draw of revocations on `cand`, and its billing plan."""
    cfg = cluster_config(base, cand.instance, cand.count, spec)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
    horizon = cfg.train.max_time * spec.time_scale
    timeline = draw_timeline(
        cand.instance,
        cand.tier,
        cand.count,
        horizon,
        revocation_rng(seed),
        replace=spec.replace,
        keep_one_live=True,
    )
    announce = revocations_announced(cand.instance, spec, model_bytes(cfg))
    events = membership_events(timeline, spec.time_scale, announce=announce)
    if events:
        cfg = with_membership(cfg, events)
    price = cand.instance.price_per_h(cand.tier)
    billing = Billing(
        tuple(RankBilling(cand.instance.name, cand.tier, price) for _ in range(cand.count)),
        spec.time_scale,
    )
    return cfg, billing, timeline


def revocation_rng(seed: int) -> random.Random:
    # Revocation draws get their own stream so they do not move when training code draws.
    return random.Random(f"revocations/{seed}")


def run_transient(
    base: ExperimentConfig, cand: Candidate, spec: TransientSpec, seed: int
) -> RunResult:
    """One sim run of `base` on `cand` with seeded revocations; summary has the cost block."""
    cfg, billing, timeline = transient_config(base, cand, spec, seed)
    result = run_sim(
        cfg,
        label=cfg.strategy.name,
        progress=False,
        description=f"{cand.label} seed {seed}",
        summary_fields=cost_fields(cfg, billing),
    )
    result.summary["candidate"] = cand.label
    result.summary["revocations_deferred"] = timeline.deferred
    return result
