"""`dlion probe`: measure this host's step times and the links between workers, and write
a config with the measured cluster (method: dlion/probe/measure.py).

    dlion probe digits-hetero --out cluster.yaml
    dlion netns up mycluster.yaml && dlion probe mycluster.yaml --netns dlion --out c.yaml

Across the hosts of a torchrun job (the same command as training, `-m dlion probe` for
`-m dlion.jobs.dist_worker`), every rank times steps on its own host and the links are measured
between the ranks; rank 0 writes the config, one worker entry per rank:

    torchrun --nnodes 2 --node-rank R --nproc-per-node 1 --master-addr HOST0 \
        --master-port 29500 -m dlion probe my-cluster.yaml --out probed.yaml
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypedDict

import typer

from dlion.cli.options import wide_console

if TYPE_CHECKING:
    from dlion.cluster.topology import Cluster
    from dlion.core.config import ExperimentConfig
    from dlion.probe.measure import PairRate, StepFit

# Above this relative miss on any timed batch size the user is told the line fits poorly.
POOR_FIT = 0.10

console = wide_console()


class _LinkArgs(TypedDict):
    """The link measurement's settings (probe.measure_links, probe.link_process.run_links)."""

    bytes_per_pair: int
    frames: int
    pings: int
    timeout_s: float


def _ints(value: str, what: str) -> list[int]:
    from dlion.core.errors import BadInput

    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--{what}: expected comma-separated integers, got {value!r}") from None
    if any(b < 1 for b in out):
        raise BadInput(f"--{what}: batch sizes must be >= 1, got {value!r}")
    return out


def probe(
    config: Annotated[str, typer.Argument(help="YAML config path or shipped scenario name.")],
    out: Annotated[Path, typer.Option(help="Where to write the config with the measured cluster.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config field (a.b=v).")
    ] = None,
    netns: Annotated[
        str | None,
        typer.Option(help="Measure links between the namespaces of this `dlion netns` prefix."),
    ] = None,
    batches: Annotated[
        str | None,
        typer.Option(
            help="Batch sizes the step-time model is fitted on (default: B/4, B, 2B "
            "around train.batch_per_worker B, the range WDB moves in)."
        ),
    ] = None,
    holdout: Annotated[
        str | None,
        typer.Option(help="Batch sizes timed to check the fit, not fitted on (default B/2, 3B/2)."),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed steps per batch size.")] = 30,
    mb_per_pair: Annotated[
        float, typer.Option(min=0.01, help="MB streamed per ordered pair of workers.")
    ] = 2.0,
    frames: Annotated[int, typer.Option(min=2, help="Frames the stream is cut into.")] = 8,
    pings: Annotated[int, typer.Option(min=1, help="Round trips timed per pair.")] = 5,
    links: Annotated[bool, typer.Option(help="Measure the links (else keep the config's).")] = True,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for any step.")] = 60.0,
) -> None:
    """Measure this host's step time and the links between workers; write a cluster YAML.

    Fits t(b) = overhead + b / speed to real steps of the configured model, measures every
    pair's bandwidth and latency through the engine's transport, and writes --out."""
    import yaml

    from dlion.cluster.topology import MBPS, Cluster
    from dlion.core.config import config_from_dict, load_config
    from dlion.core.timescale import TimeScale
    from dlion.probe import measure as p

    cfg = load_config(config, list(set_ or []))
    if links and netns is not None:  # a prefix that is not up fails now, not after the steps
        from dlion.engines import netns as namespaces

        namespaces.check_host()
        namespaces.load_plan(netns)
    b = cfg.train.batch_per_worker
    fit_on = _ints(batches, "batches") if batches else sorted({max(1, b // 4), b, 2 * b})
    check_on = _ints(holdout, "holdout") if holdout else sorted({max(1, b // 2), 3 * b // 2})
    check_on = [c for c in check_on if c not in fit_on]
    torchrun = _torchrun_rank()
    if torchrun is not None:
        from dlion.core.errors import BadInput
        from dlion.core.preflight import check_world_size

        if netns is not None:
            raise BadInput("--netns: not under torchrun (each rank is already on its own host)")
        # Before any step is timed: every rank fails alike, at once.
        check_world_size(torchrun[1], Cluster.from_config(cfg.cluster).size)
    times = p.measure_step_times(cfg, fit_on + check_on, repeats)
    fit = p.fit_step_time(fit_on, [times[b] for b in fit_on])
    flops = p.flops_per_sample(cfg)
    _report_fit(cfg, fit, times, fit_on, flops)
    cluster = Cluster.from_config(cfg.cluster)
    link_args: _LinkArgs = {
        "bytes_per_pair": int(mb_per_pair * 1e6),
        "frames": frames,
        "pings": pings,
        "timeout_s": timeout,
    }
    fits: p.StepFit | list[p.StepFit] = fit
    rates: list[p.PairRate] = []
    if torchrun is not None:
        fits, rates = _across_torchrun(fit, links, link_args, *torchrun)
        if torchrun[0] != 0:
            _leave_now()  # rank 0 writes the config
    elif links:
        rates = p.measure_links(cluster.size, netns_prefix=netns, **link_args)
    scale = TimeScale(cfg.engine.time_scale)
    for r in rates:
        expected = _configured_rate(cluster, r.src, r.dst)
        measured = scale.scenario_rate(r.bytes_per_s)
        console.print(
            f"  {r.src} -> {r.dst}: {measured / MBPS:9.2f} Mbit/s (config "
            f"{expected / MBPS:.2f}, {measured / expected - 1:+.1%}), latency "
            f"{scale.scenario(r.latency_s) * 1e3:.3f} ms"
        )
    raw = p.measured_config(cfg, fits, flops, rates)
    config_from_dict(raw)  # what we write must load
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# dlion probe {config}: measured step model" + (" and links\n" if rates else "\n")
    out.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    console.print(f"wrote {out}")
    if torchrun is not None:
        _leave_now()


def _leave_now() -> None:
    """Exit 0 at once: the pair groups' threads still block in gloo, and an interpreter
    that finalizes around them aborts (SIGABRT), which torchrun reports as a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _report_fit(
    cfg: ExperimentConfig, fit: StepFit, times: dict[int, float], fit_on: list[int], flops: int
) -> None:
    console.print(
        f"step time ({cfg.engine.threads} thread(s)): {fit.overhead_s * 1e3:.3f} ms + "
        f"b x {1e6 / fit.samples_per_s:.2f} us ({fit.samples_per_s * flops / 1e9:.3g} GFLOP/s "
        f"at {flops} FLOPs/sample)"
    )
    for b in sorted(times):
        kind = "fit" if b in fit_on else "held out"
        err = fit.predict(b) / times[b] - 1
        console.print(
            f"  batch {b:>5}: measured {times[b] * 1e3:8.3f} ms, model "
            f"{fit.predict(b) * 1e3:8.3f} ms ({err:+.1%}, {kind})"
        )
    worst = max(abs(fit.predict(b) / times[b] - 1) for b in times)
    if worst > POOR_FIT:
        console.print(
            f"  warning: the line misses a measured step by {worst:.0%}: step times are not "
            "linear over these batch sizes; fit on the range you train at (--batches)"
        )


def _torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    from dlion.core.errors import BadInput

    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise BadInput("probe: RANK and WORLD_SIZE must be set under torchrun") from None


def _across_torchrun(
    fit: StepFit,
    links: bool,
    link_args: _LinkArgs,
    rank: int,
    world: int,
) -> tuple[list[StepFit], list[PairRate]]:
    """This rank's part of a probe across torchrun's hosts: publish its step fit, measure
    the links with the others (rank 0 drives the pairs); rank 0 returns every rank's fit
    and the rates."""
    import torch.distributed as dist

    from dlion.jobs.dist_worker import store_from_env
    from dlion.probe import measure as p
    from dlion.probe.link_process import run_links

    timeout = link_args["timeout_s"]
    job_factory, _, _ = store_from_env(world, rank, timeout)

    def factory() -> dist.Store:
        return dist.PrefixStore("probe/", job_factory())

    store = factory()
    store.set(f"fit/{rank}", json.dumps([fit.overhead_s, fit.samples_per_s]))
    rates: list[PairRate] = []
    if links and world > 1:
        driver = None
        if rank == 0:

            def drive() -> None:
                rates.extend(p.drive_pairs(factory(), world, [], timeout))

            driver = threading.Thread(target=drive, name="probe-driver", daemon=True)
            driver.start()
        run_links(rank, world, factory, **link_args)
        if driver is not None:
            driver.join(timeout)
    if rank != 0:
        return [], []
    fits = []
    for r in range(world):
        store.wait([f"fit/{r}"])
        overhead, speed = json.loads(store.get(f"fit/{r}").decode())
        fits.append(p.StepFit(overhead, speed, fit.batches, ()))
        console.print(f"  rank {r}: {overhead * 1e3:.3f} ms + b x {1e6 / speed:.2f} us")
    return fits, rates


def _configured_rate(cluster: Cluster, src: int, dst: int) -> float:
    """Bytes/s a lone flow src -> dst gets by the config (link, then both NICs)."""
    rate = cluster.bandwidth(src, dst)
    for nic in (cluster.workers[src].nic_bytes_per_s, cluster.workers[dst].nic_bytes_per_s):
        if nic is not None:
            rate = min(rate, nic)
    return rate
