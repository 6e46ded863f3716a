"""Performance model: step time from model FLOPs, batch, instance capacity and per-iteration
communication; checkpoint time from model size. Both are linear in physical features and
fitted by least squares from profiles (ICDCS '20 predicts step time from FLOPs and
checkpoint time from model size the same way).

Profiles of step time come from short sim runs (`profile_step`); on real machines the same
`StepProfile` would be filled from the dist engine's measured iteration times, and the fit
is unchanged. Checkpoint profiles are real: `measure_checkpoint` writes safetensors files
(temp file, fsync, rename, as a real checkpoint is written) on this machine and times them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from dlion.cluster.topology import MBPS
from dlion.core.config import ExperimentConfig, with_changes
from dlion.core.files import write_atomic
from dlion.engines.sim import run_sim
from dlion.training.experiment import prepare
from dlion.transient.runs import model_bytes

STEP_FEATURES = ("compute_s", "comm_s", "server_excess_s", "constant_s")


@dataclass(frozen=True)
class StepFeatures:
    """Physical estimates (seconds) for one worker iteration of a homogeneous cluster under
    a parameter server whose role sits on one of the workers."""

    compute_s: float  # FLOPs per sample x batch / capacity
    # Push a gradient, pull the parameters: 2 x (bytes / bandwidth + latency), paid by the
    # n - 1 remote workers (the server node's own worker applies locally): mean over workers.
    comm_s: float
    # The server's NIC carries every remote worker's push and pull; when that takes longer
    # than a worker's own compute and transfers, the server is the bottleneck: the excess.
    server_excess_s: float

    def vector(self) -> np.ndarray:
        return np.array([self.compute_s, self.comm_s, self.server_excess_s, 1.0])


def step_features(cfg: ExperimentConfig) -> StepFeatures:
    """Features of `cfg`'s first worker type and site link (a homogeneous cluster)."""
    n = sum(w.count for w in cfg.cluster.workers)
    worker = cfg.cluster.workers[0]
    site = next(s for s in cfg.cluster.sites if s.name == worker.site)
    flops = prepare(cfg, n).flops_per_sample
    nbytes = model_bytes(cfg) + cfg.engine.header_bytes
    bw = site.intra_bandwidth_mbps * MBPS
    nic = min(worker.nic_mbps or math.inf, site.intra_bandwidth_mbps) * MBPS
    latency = site.intra_latency_ms / 1e3
    compute = flops * cfg.train.batch_per_worker / (worker.capacity_gflops * 1e9)
    comm = (n - 1) / n * 2 * (nbytes / bw + latency)
    server = (n - 1) * 2 * nbytes / nic
    return StepFeatures(compute, comm, max(0.0, server - (compute + 2 * (nbytes / bw))))


@dataclass(frozen=True)
class StepProfile:
    features: StepFeatures
    step_s: float  # measured seconds per iteration
    label: str = ""


def profile_step(cfg: ExperimentConfig, iterations: int) -> StepProfile:
    """Measure seconds per iteration with a short sim run of `iterations` iterations."""
    probe = with_changes(
        cfg,
        [
            f"train.max_iterations={iterations}",
            "train.stop_at_target=false",
            "train.max_time=1000000",
            "evaluation.every_s=1000000",  # evaluation costs no virtual time; skip its wall time
        ],
    )
    s = run_sim(probe, progress=False).summary
    return StepProfile(step_features(cfg), s["time_s"] / max(1, s["iterations"]), cfg.name)


@dataclass(frozen=True)
class StepModel:
    coef: tuple[float, ...]  # one per STEP_FEATURES

    def predict(self, f: StepFeatures) -> float:
        return float(np.dot(self.coef, f.vector()))


def fit_step_model(profiles: Sequence[StepProfile]) -> StepModel:
    """Least squares on relative error (rows divided by the measured time), so short and
    long steps weigh the same."""
    if len(profiles) < 2:
        raise ValueError("fit_step_model needs at least 2 profiles")
    x = np.array([p.features.vector() for p in profiles])
    y = np.array([p.step_s for p in profiles])
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    return StepModel(tuple(float(c) for c in coef))


def relative_errors(model: StepModel, profiles: Sequence[StepProfile]) -> list[float]:
    """|predicted - measured| / measured per profile."""
    return [abs(model.predict(p.features) - p.step_s) / p.step_s for p in profiles]


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointModel:
    overhead_s: float
    mb_per_s: float

    def predict(self, nbytes: int) -> float:
        return self.overhead_s + nbytes / (self.mb_per_s * 1e6)


def measure_checkpoint(nbytes: int, folder: Path, repeats: int = 3) -> float:
    """Seconds to write a checkpoint of `nbytes` of float32 tensors atomically: the fastest
    of `repeats` writes, since other work on a shared machine only ever adds time."""
    tensors = {"params": torch.zeros(max(1, nbytes // 4), dtype=torch.float32)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        write_atomic(folder / "checkpoint.safetensors", lambda tmp: save_file(tensors, tmp))
        times.append(time.perf_counter() - start)
    return min(times)


def fit_checkpoint_model(sizes: Sequence[int], seconds: Sequence[float]) -> CheckpointModel:
    """t = overhead + bytes / bandwidth, least squares on relative error (sizes span
    orders of magnitude; absolute error would fit only the largest)."""
    if len(sizes) < 2:
        raise ValueError("fit_checkpoint_model needs at least 2 measurements")
    y = np.array(seconds)
    x = np.array([[1.0, s] for s in sizes]) / y[:, None]
    (overhead, per_byte), *_ = np.linalg.lstsq(x, np.ones_like(y), rcond=None)
    per_byte = max(float(per_byte), 1e-15)  # a flat profile: writes cost no per-byte time
    return CheckpointModel(max(0.0, float(overhead)), 1.0 / per_byte / 1e6)
