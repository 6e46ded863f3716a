"""How a small simulated workload stands for a real training job on catalog instances."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TransientSpec(BaseModel):
    """The sim trains a small model (digits/mlp) for seconds; the papers' jobs (ResNet-32 on
    CIFAR-10) run for hours. Two factors map one onto the other: `capacity_scale` turns an
    instance's real throughput into the sim's, so a sim step stands for a real step;
    `time_scale` says how many real seconds one simulated second stands for, so revocation
    times, warnings and startup delays shrink by it and instance-hours grow by it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time_scale: float = Field(
        3600.0,
        gt=0,
        description="Real seconds per simulated second. 3600: one sim second is one hour, so "
        "a digits/mlp job of ~5 sim s on one worker stands for a ~5 h single-K80 job.",
    )
    capacity_scale: float = Field(
        1e-3,
        gt=0,
        description="Sim GFLOP/s per effective real GFLOP/s. 1e-3 maps a K80 (~218 effective "
        "GFLOP/s) to ~0.22 GFLOP/s, the scale of the shipped scenarios' workers.",
    )
    replace: bool = Field(True, description="Request a replacement for every revoked instance.")
    warning_s: float | None = Field(
        None, ge=0, description="Override the catalog's revocation notice (real seconds)."
    )
    checkpoint_overhead_s: float = Field(
        0.5,
        ge=0,
        description="Fixed part of a checkpoint write (real s): open, fsync, rename. "
        "Fit from measurements with `dlion transient perf`.",
    )
    checkpoint_mb_per_s: float = Field(
        100.0, gt=0, description="Checkpoint write bandwidth (MB/s) to the checkpoint store."
    )
    bandwidth_mbps: float = Field(
        10_000.0, gt=0, description="Link bandwidth between instances (same zone), Mbit/s."
    )
    latency_ms: float = Field(0.1, ge=0, description="Latency between instances, ms.")

    def checkpoint_s(self, model_bytes: int) -> float:
        """Real seconds to checkpoint a model of `model_bytes` bytes."""
        return self.checkpoint_overhead_s + model_bytes / (self.checkpoint_mb_per_s * 1e6)
