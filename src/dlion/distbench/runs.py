"""Benchmarks of the dist engine: sim-dist parity, overhead against PyTorch DDP, a fault run.

Each compares side by side in one command and writes JSON plus a markdown table:
- parity: the same scenario and seed in the sim and on real processes (time-scaled);
  the ratio of dist TTA (scenario seconds = wall / time_scale) to the sim's TTA.
- ddp: 2 local workers, homogeneous, no shaping, no throttling: dlion's allreduce
  strategy against torch DistributedDataParallel with the same model, data and batch;
  the ratio of per-iteration wall times, both past 20 warm-up iterations.
- fault: one worker SIGKILLed at a fraction of the fault-free run's TTA; detection time,
  time lost, final accuracy against the fault-free run.
- kernel: links paced in the transport against links shaped by tc in one network
  namespace per worker (root only); the ratio of TTAs.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dlion.cluster.topology import Cluster
from dlion.core.config import ExperimentConfig, load_config
from dlion.core.errors import BadInput
from dlion.engines.launcher import Fault, run_dist
from dlion.engines.sim import run_sim
from dlion.report import read_metrics, write_json_atomic
from dlion.training.experiment import make_replica, prepare


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def _write(out_dir: Path, name: str, rows: list[dict[str, Any]], table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": machine(), "rows": rows}
    write_json_atomic(out_dir / f"{name}.json", meta)
    (out_dir / f"{name}.md").write_text(table + "\n")


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------- parity


def parity(
    scenario: str,
    strategies: list[str],
    seeds: list[int],
    time_scale: float,
    out_dir: Path,
    overrides: list[str],
) -> list[dict[str, Any]]:
    rows = []
    for strategy in strategies:
        for seed in seeds:
            sets = [f"strategy.name={strategy}", f"train.seed={seed}", *overrides]
            cfg = load_config(scenario, sets)
            sim = run_sim(cfg, progress=False).summary
            dcfg = load_config(
                scenario, [*sets, "engine.name=dist", f"engine.time_scale={time_scale}"]
            )
            run_dir = out_dir / "runs" / f"parity-{strategy}-seed{seed}"
            real = run_dist(
                dcfg, out_dir=run_dir, description=f"{scenario} {strategy} dist"
            ).summary
            ratio = None
            if sim["tta_s"] and real["tta_scenario_s"]:
                ratio = real["tta_scenario_s"] / sim["tta_s"]
            rows.append(
                {
                    "scenario": scenario,
                    "strategy": strategy,
                    "seed": seed,
                    "time_scale": time_scale,
                    "sim_tta_s": sim["tta_s"],
                    "dist_tta_wall_s": real["tta_s"],
                    "dist_tta_scenario_s": real["tta_scenario_s"],
                    "ratio": ratio,
                    "sim_final_acc": sim["final_acc"],
                    "dist_final_acc": real["final_acc"],
                    "sim_bytes": sim["bytes_sent"],
                    "dist_bytes": real["bytes_sent"],
                    "compute_overruns": real["compute_overruns"],
                    # Vector work (vector_cost.py), scenario seconds over all workers.
                    "sim_vector_s": sim.get("vector_charged_s", 0.0),
                    "dist_vector_s": real.get("vector_charged_s", 0.0),
                    "charge_overruns": real.get("charge_overruns", 0),
                }
            )
    table = "\n".join(
        [
            "| strategy | seed | sim TTA (s) | dist TTA (scenario s) | dist / sim | "
            "sim acc | dist acc | compute overruns | vector s sim / dist | charge overruns |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {r['strategy']} | {r['seed']} | {_fmt(r['sim_tta_s'])} | "
                f"{_fmt(r['dist_tta_scenario_s'])} | {_fmt(r['ratio'])} | "
                f"{r['sim_final_acc']:.3f} | {r['dist_final_acc']:.3f} | {r['compute_overruns']} | "
                f"{r['sim_vector_s']:.2f} / {r['dist_vector_s']:.2f} | {r['charge_overruns']} |"
                for r in rows
            ),
        ]
    )
    _write(out_dir, "parity", rows, table)
    return rows


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(
    rank: int, world: int, port: int, cfg: ExperimentConfig, iters: int, warmup: int, out: Any
) -> None:
    torch.set_num_threads(cfg.engine.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    prep = prepare(cfg, world)
    replica = make_replica(cfg, prep, rank)  # same model, shard and batch order as dlion
    model = torch.nn.parallel.DistributedDataParallel(replica.model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    batch = cfg.train.batch_per_worker
    start = 0.0
    for i in range(warmup + iters):
        if i == warmup:
            dist.barrier()
            start = time.perf_counter()
        x, y = replica.next_batch(batch)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # DDP all-reduces gradient buckets during backward
        opt.step()
    dist.barrier()
    if rank == 0:
        out.put((time.perf_counter() - start) / iters)
    dist.destroy_process_group()


def steady_iteration_time(metrics: Path, warmup: int) -> float | None:
    """Wall seconds per iteration between the first evaluation point past `warmup`
    iterations and the last one, as DDP is timed after its warm-up (None: too few points)."""
    points = [e for e in read_metrics(metrics) if e.get("event") == "eval"]
    past = [e for e in points if e["iteration"] >= warmup]
    if len(past) < 2 or past[-1]["iteration"] <= past[0]["iteration"]:
        return None
    return (past[-1]["t"] - past[0]["t"]) / (past[-1]["iteration"] - past[0]["iteration"])


def ddp_iteration_time(cfg: ExperimentConfig, iters: int, warmup: int = 20) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), cfg, iters, warmup, out),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return float(out.get())


def ddp_overhead(
    scenario: str, models: dict[str, list[str]], wall_s: float, out_dir: Path
) -> list[dict[str, Any]]:
    rows = []
    for label, model_sets in models.items():
        sets = [
            "strategy.name=allreduce",
            # Two workers, one site, no throttling (capacity far above the real speed), no shaping.
            "cluster.workers=[{site: " + "site-a" + ", capacity_gflops: 1000000, count: 2}]",
            "cluster.sites=[{name: site-a}]",
            "cluster.links=[]",
            "train.stop_at_target=false",
            f"train.max_time={wall_s}",
            f"evaluation.every_s={wall_s / 4}",
            *model_sets,
        ]
        cfg = load_config(scenario, sets)
        dcfg = load_config(scenario, [*sets, "engine.name=dist", "engine.shaping=none"])
        run_dir = out_dir / "runs" / f"ddp-{label}"
        real = run_dist(dcfg, out_dir=run_dir, description=f"dlion allreduce {label}").summary
        whole_run = real["time_s"] / max(1, real["iterations"])
        ours = steady_iteration_time(run_dir / "metrics.jsonl", warmup=20) or whole_run
        ddp_iters = max(50, int(real["iterations"]))
        theirs = ddp_iteration_time(cfg, ddp_iters)
        params = make_replica(cfg, prepare(cfg, 2), 0).numel
        rows.append(
            {
                "model": label,
                "parameters": params,
                "dlion_allreduce_ms": ours * 1e3,
                "ddp_ms": theirs * 1e3,
                "ratio": ours / theirs,
                # Start-up and the first iterations included (DDP's exclude 20 warm-up ones).
                "dlion_whole_run_ms": whole_run * 1e3,
                "dlion_iterations": real["iterations"],
                "ddp_iterations": ddp_iters,
                # The host's 1-minute load average after both measurements.
                "load": os.getloadavg()[0],
            }
        )
    table = "\n".join(
        [
            "| model | parameters | dlion allreduce (ms/it) | DDP (ms/it) | ratio | load |",
            "|---|---:|---:|---:|---:|---:|",
            *(
                f"| {r['model']} | {r['parameters']:,} | {r['dlion_allreduce_ms']:.2f} | "
                f"{r['ddp_ms']:.2f} | {r['ratio']:.2f} | {r['load']:.1f} |"
                for r in rows
            ),
        ]
    )
    _write(out_dir, "ddp", rows, table)
    return rows


# ----------------------------------------------------------------------------- fault


def check_fault(
    scenario: str,
    strategy: str,
    time_scale: float,
    kill_rank: int,
    at_fraction: float,
    overrides: list[str],
) -> None:
    """The fault benchmark's arguments, checked before its first (long) run."""
    sets = [f"strategy.name={strategy}", "engine.name=dist", f"engine.time_scale={time_scale}"]
    cfg = load_config(scenario, [*sets, *overrides])
    size = Cluster.from_config(cfg.cluster).size
    if not 0 <= kill_rank < size:
        raise BadInput(f"--rank: no worker {kill_rank} in {scenario} (ranks 0..{size - 1})")
    if not 0 < at_fraction < 1:
        raise BadInput(
            f"--at: a fraction of the fault-free time to accuracy, in (0, 1), got {at_fraction:g}"
        )


def fault_run(
    scenario: str,
    strategy: str,
    time_scale: float,
    kill_rank: int,
    at_fraction: float,
    out_dir: Path,
    overrides: list[str],
) -> dict[str, Any]:
    sets = [f"strategy.name={strategy}", "engine.name=dist", f"engine.time_scale={time_scale}"]
    cfg = load_config(scenario, [*sets, *overrides])
    clean = run_dist(cfg, out_dir=out_dir / "runs" / "fault-free", description="fault-free").summary
    if clean["tta_scenario_s"] is None:
        raise RuntimeError("the fault-free run did not reach the target; raise train.max_time")
    at = at_fraction * clean["tta_scenario_s"]
    faulty = run_dist(
        cfg,
        out_dir=out_dir / "runs" / "killed",
        faults=[Fault(kill_rank, at, "KILL")],
        description=f"rank {kill_rank} killed at {at:.2f} s",
    ).summary
    [change] = [m for m in faulty["membership"] if m["rank"] == kill_rank]
    lost = None
    if faulty["tta_scenario_s"] is not None:
        lost = faulty["tta_scenario_s"] - clean["tta_scenario_s"]
    row = {
        "scenario": scenario,
        "strategy": strategy,
        "time_scale": time_scale,
        "killed_rank": kill_rank,
        "killed_at_scenario_s": at,
        "detected_after_wall_s": change["detected_after_s"],
        "peer_timeout_s": cfg.engine.peer_timeout,
        "fault_free_tta_scenario_s": clean["tta_scenario_s"],
        "faulty_tta_scenario_s": faulty["tta_scenario_s"],
        "time_lost_scenario_s": lost,
        "fault_free_final_acc": clean["final_acc"],
        "faulty_final_acc": faulty["final_acc"],
    }
    table = "\n".join(
        [
            "| detected after (wall s) | fault-free TTA (scenario s) | with kill TTA | time lost | "
            "final acc (fault-free / kill) |",
            "|---:|---:|---:|---:|---:|",
            f"| {_fmt(row['detected_after_wall_s'], 3)} | {_fmt(clean['tta_scenario_s'])} | "
            f"{_fmt(faulty['tta_scenario_s'])} | {_fmt(lost)} | "
            f"{clean['final_acc']:.3f} / {faulty['final_acc']:.3f} |",
        ]
    )
    _write(out_dir, "fault", [row], table)
    return row


# ----------------------------------------------------------------------------- kernel shaping


def kernel_vs_transport(
    scenario: str,
    strategy: str,
    seeds: list[int],
    repeats: int,
    time_scale: float,
    out_dir: Path,
    overrides: list[str],
    prefix: str,
) -> list[dict[str, Any]]:
    """The same dist run with links paced in the transport and shaped by tc in namespaces
    (engines/netns.py, set up and torn down here; root only). Runs alternate, transport
    then kernel, so a change in the host's load hits both alike."""
    from dlion.engines import netns

    sets = [
        f"strategy.name={strategy}",
        "engine.name=dist",
        f"engine.time_scale={time_scale}",
        *overrides,
    ]
    base = load_config(scenario, sets)
    rows: list[dict[str, Any]] = []
    plan = netns.up(netns.plan_for(base, prefix))
    try:
        for seed in seeds:
            # The sim of the same seed (each seed's, not the default seed's for all).
            sim = run_sim(load_config(scenario, [*sets, f"train.seed={seed}"]), progress=False)
            sim_tta = sim.summary["tta_s"]
            for rep in range(repeats):
                for mode in ("transport", "kernel"):
                    cfg = load_config(
                        scenario, [*sets, f"train.seed={seed}", f"engine.shaping={mode}"]
                    )
                    run_dir = out_dir / "runs" / f"kernel-{mode}-seed{seed}-{rep}"
                    s = run_dist(
                        cfg,
                        out_dir=run_dir,
                        netns=plan.prefix if mode == "kernel" else None,
                        description=f"{scenario} {strategy} {mode} seed {seed} #{rep}",
                    ).summary
                    rows.append(
                        {
                            "scenario": scenario,
                            "strategy": strategy,
                            "shaping": mode,
                            "seed": seed,
                            "repeat": rep,
                            "time_scale": time_scale,
                            "tta_wall_s": s["tta_s"],
                            "tta_scenario_s": s["tta_scenario_s"],
                            "sim_tta_s": sim_tta,
                            "final_acc": s["final_acc"],
                            "iterations": s["iterations"],
                            "bytes_sent": s["bytes_sent"],
                            "compute_overruns": s["compute_overruns"],
                            "sim_iterations": sim.summary["iterations"],
                            "sim_vector_s": sim.summary.get("vector_charged_s", 0.0),
                            "vector_s": s.get("vector_charged_s", 0.0),
                            "charge_overruns": s.get("charge_overruns", 0),
                            "load": os.getloadavg()[0],
                        }
                    )
    finally:
        netns.down(plan.prefix)

    def tta(mode: str) -> list[float]:
        done = [r["tta_scenario_s"] for r in rows if r["shaping"] == mode]
        return sorted(t for t in done if t is not None)

    lines = [
        "| shaping | seed | run | TTA (scenario s) | sim TTA (s) | dist / sim | TTA (wall s) | "
        "final acc | iterations (sim) | MB sent | overruns | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['shaping']} | {r['seed']} | {r['repeat']} | {_fmt(r['tta_scenario_s'])} | "
            f"{_fmt(r['sim_tta_s'])} | {_fmt(_ratio(r['tta_scenario_s'], r['sim_tta_s']))} | "
            f"{_fmt(r['tta_wall_s'])} | {r['final_acc']:.3f} | {r['iterations']} "
            f"({r['sim_iterations']}) | {r['bytes_sent'] / 1e6:.1f} | {r['compute_overruns']} | "
            f"{r['load']:.1f} |"
            for r in rows
        ),
    ]
    kernel, transport = tta("kernel"), tta("transport")
    if kernel and transport:
        k, t = statistics.median(kernel), statistics.median(transport)
        lines += [
            "",
            f"median TTA (scenario s): kernel {k:.2f} (range {kernel[0]:.2f}-{kernel[-1]:.2f}, "
            f"{len(kernel)} runs), transport {t:.2f} (range {transport[0]:.2f}-"
            f"{transport[-1]:.2f}, {len(transport)} runs); kernel / transport = {k / t:.2f}; "
            f"sim {', '.join(_fmt(r['sim_tta_s']) for r in rows if r['shaping'] == 'kernel')}",
        ]
    _write(out_dir, "kernel", rows, "\n".join(lines))
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
