"""`dlion probe`: measure what a config assumes (step times, links) and write a cluster.

Step time. A training step of the configured model on this host is timed (unthrottled,
`engine.threads` torch threads, the batch sizes taking turns, the lower quartile of
`repeats` steps each: see measure_step_times) at several batch sizes and fitted by least
squares to

    t(b) = a + b / s          (a: fixed seconds per step, s: samples per second),

which a worker's config states as `step_overhead_ms = 1000 a` and
`capacity_gflops = s x FLOPs per sample / 1e9` (cluster.py: compute_time). Batch sizes held
out of the fit check the model on steps it was not fitted on.

Links. One process per worker (inside its `dlion netns` namespace when a prefix is given,
else on loopback) joins the probe's store, and every pair of workers connects through the
engine's own transport (comm/transport.py: per-pair gloo groups). Then, one ordered pair
at a time, the sender streams `frames` frames of `bytes_per_pair / frames` bytes back to
back and the receiver times them: bandwidth = the bytes of frames 2..F over the time from
the last byte of frame 1 to the last byte of frame F (the link stays busy, so neither the
start-up of the first frame nor the receiver's wake-up enters it); latency = half the
smallest round trip of `pings` one-byte frames, echoed by the receiver. Rates are payload
bytes per wall second, times `engine.time_scale` (dlion netns divides tc rates by it), so a
probe of a correctly shaped cluster reproduces its config.

The written config is the input config with the measured cluster: every worker gets this
host's fitted capacity and overhead; each pair of sites (or a site with itself) gets the
mean of the measured rates and latencies of the worker pairs between them, both directions.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from dlion.cluster.topology import MBPS
from dlion.core.config import ExperimentConfig
from dlion.core.errors import BadInput, DlionError
from dlion.core.timescale import TimeScale

# Store keys of a probe run (the worker side is dlion/probe/link_process.py).
KEY_GO = "go/{k}"  # the master starts ordered pair k
KEY_BW = "bw/{k}"  # the receiver's bytes/s for pair k
KEY_LAT = "lat/{k}"  # the sender's one-way latency (s) for pair k
KEY_READY = "ready/{rank}"
KEY_END = "end"


class ProbeError(DlionError):
    """The probe could not measure (a worker process failed or timed out)."""


@dataclass(frozen=True)
class StepFit:
    overhead_s: float  # a
    samples_per_s: float  # s
    batches: tuple[int, ...]  # fitted on
    seconds: tuple[float, ...]  # measured medians at those batches

    def predict(self, batch: int) -> float:
        return self.overhead_s + batch / self.samples_per_s


@dataclass(frozen=True)
class PairRate:
    src: int
    dst: int
    bytes_per_s: float  # payload, wall (not scaled)
    latency_s: float


def fit_step_time(batches: list[int], seconds: list[float]) -> StepFit:
    """Least-squares line t = a + c b through (batch, seconds); s = 1 / c; a >= 0."""
    if len(batches) != len(seconds) or len(set(batches)) < 2:
        raise BadInput("probe: the step-time fit needs at least two different batch sizes")
    n = len(batches)
    mb, mt = sum(batches) / n, sum(seconds) / n
    sxx = sum((b - mb) ** 2 for b in batches)
    sxy = sum((b - mb) * (t - mt) for b, t in zip(batches, seconds, strict=True))
    slope = sxy / sxx
    if not slope > 0:
        seen = dict(zip(batches, seconds, strict=True))
        raise ProbeError(
            f"probe: step times do not grow with the batch ({seen}); "
            "use larger batch sizes (--batches)"
        )
    intercept = mt - slope * mb
    if intercept < 0:  # a negative fixed cost is noise: refit through the origin
        slope = sum(b * t for b, t in zip(batches, seconds, strict=True)) / sum(
            b * b for b in batches
        )
        intercept = 0.0
    return StepFit(intercept, 1.0 / slope, tuple(batches), tuple(seconds))


def measure_step_times(
    cfg: ExperimentConfig, batches: list[int], repeats: int, warmup: int = 3
) -> dict[int, float]:
    """Unthrottled seconds of one training step of the configured model, per batch size.

    The batch sizes take turns (one step each per round), so a neighbour's load that comes
    and goes hits every size alike instead of whichever was being timed; each size's time
    is the lower quartile of its `repeats` steps: the step as the host runs it undisturbed
    (the upper part of the distribution measures the neighbours, not the model)."""
    import torch

    from dlion.training.experiment import make_replica, prepare

    torch.set_num_threads(cfg.engine.threads)
    prep = prepare(cfg, 1)
    replica = make_replica(cfg, prep, 0)
    sizes = sorted(set(batches))
    for b in sizes:
        for _ in range(warmup):
            replica.gradient(b)
    times: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(repeats):
        for b in sizes:
            start = time.perf_counter()
            replica.gradient(b)
            times[b].append(time.perf_counter() - start)
    return {b: _lower_quartile(t) for b, t in times.items()}


def _lower_quartile(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 4]


def flops_per_sample(cfg: ExperimentConfig) -> int:
    from dlion.training.experiment import prepare

    return prepare(cfg, 1).flops_per_sample


# ----------------------------------------------------------------------------- links


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ordered_pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(n) if i != j]


def measure_links(
    n: int,
    *,
    netns_prefix: str | None,
    bytes_per_pair: int,
    frames: int,
    pings: int,
    timeout_s: float,
) -> list[PairRate]:
    """Bandwidth and latency of every ordered pair of `n` worker processes (module doc)."""
    import datetime

    import torch.distributed as dist

    if n < 2:
        return []
    plan = None
    if netns_prefix is not None:
        from dlion.engines import netns

        netns.check_host()
        plan = netns.load_plan(netns_prefix)
        if len(plan.workers) != n:
            raise BadInput(
                f"--netns {netns_prefix}: set up for {len(plan.workers)} workers, the config "
                f"has {n}"
            )
    host = "127.0.0.1" if plan is None else plan.hub
    port = _free_port(host)
    store = dist.TCPStore(
        host, port, None, True, timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(n):
            argv = [sys.executable, "-m", "dlion.probe.link_process", str(rank), str(n), host]
            argv += [str(port), str(bytes_per_pair), str(frames), str(pings), str(timeout_s)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            if plan is not None:
                argv = ["ip", "netns", "exec", plan.workers[rank].netns, *argv]
                env["GLOO_SOCKET_IFNAME"] = "eth0"
            else:
                env["GLOO_SOCKET_IFNAME"] = "lo"
            procs.append(
                subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            )
        rates = drive_pairs(store, n, procs, timeout_s)
        for p in procs:
            p.wait(timeout=timeout_s)
        return rates
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def drive_pairs(
    store: Any, n: int, procs: list[subprocess.Popen[bytes]], timeout_s: float
) -> list[PairRate]:
    """The master's part: start each ordered pair in turn, collect its rates, end."""
    _wait_keys(store, [KEY_READY.format(rank=r) for r in range(n)], procs, timeout_s)
    rates: list[PairRate] = []
    for k, (i, j) in enumerate(ordered_pairs(n)):
        store.set(KEY_GO.format(k=k), "1")
        _wait_keys(store, [KEY_BW.format(k=k), KEY_LAT.format(k=k)], procs, timeout_s)
        bw = float(store.get(KEY_BW.format(k=k)).decode())
        lat = float(store.get(KEY_LAT.format(k=k)).decode())
        rates.append(PairRate(i, j, bw, lat))
    store.set(KEY_END, "1")
    return rates


def _wait_keys(store: Any, keys: list[str], procs: list[subprocess.Popen[bytes]], t: float) -> None:
    deadline = time.time() + t
    while not all(store.check([k]) for k in keys):
        for rank, p in enumerate(procs):
            if p.poll() is not None and p.returncode != 0:
                out = p.stdout.read().decode(errors="replace") if p.stdout else ""
                last = out.strip().splitlines()[-1] if out.strip() else f"exit {p.returncode}"
                raise ProbeError(f"probe: worker process {rank} failed: {last}")
        if time.time() > deadline:
            raise ProbeError(f"probe: no answer within {t:g} s (waiting for {keys[0]})")
        time.sleep(0.01)


# ----------------------------------------------------------------------------- the cluster


def measured_config(
    cfg: ExperimentConfig, fit: StepFit | list[StepFit], flops: int, rates: list[PairRate]
) -> dict[str, Any]:
    """The config (as plain data) with the measured step model and links. `fit`: this
    host's, for every worker; or one per rank (each rank timed on its own host, under
    torchrun), which writes one worker entry per rank (`count` expanded)."""
    raw = cfg.model_dump(mode="json")
    scale = TimeScale(cfg.engine.time_scale)
    if isinstance(fit, list):
        expanded = []
        for w in raw["cluster"]["workers"]:
            expanded += [{**w, "count": 1} for _ in range(w["count"])]
        if len(expanded) != len(fit):
            raise BadInput(f"probe: {len(fit)} step fits for {len(expanded)} workers")
        raw["cluster"]["workers"] = expanded
        fits = fit
    else:
        fits = [fit] * len(raw["cluster"]["workers"])
    for w, f in zip(raw["cluster"]["workers"], fits, strict=True):
        w["capacity_gflops"] = _round(f.samples_per_s * flops / 1e9)
        w["step_overhead_ms"] = _round(f.overhead_s * 1e3)
    sites: list[str] = []
    for w in cfg.cluster.workers:
        sites += [w.site] * w.count
    groups: dict[tuple[str, str], list[PairRate]] = {}
    for r in rates:
        key = tuple(sorted((sites[r.src], sites[r.dst])))
        groups.setdefault(key, []).append(r)  # type: ignore[arg-type]
    if not rates:  # links not probed: keep the config's
        return raw
    links = []
    for (a, b), members in sorted(groups.items()):
        mbps = scale.scenario_rate(statistics.mean(r.bytes_per_s for r in members)) / MBPS
        ms = scale.scenario(statistics.mean(r.latency_s for r in members)) * 1e3
        links.append({"sites": [a, b], "bandwidth_mbps": _round(mbps), "latency_ms": _round(ms)})
    # Per-pair entries of the input are replaced by what was measured between their sites.
    raw["cluster"]["links"] = links
    return raw


def _round(x: float) -> float:
    """Four significant digits: a measurement, not a float's noise."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.4g}")
