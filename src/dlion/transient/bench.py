"""`dlion transient bench` and `dlion transient perf`: the numbers of issue 6.

- paper: the ICAC '19 comparison rebuilt in the sim: 8 transient workers of one type vs 1
  on-demand worker of that type, the same work (epochs) for both, asynchronous parameter
  server; speedup, cost saving, accuracy gap over seeds.
- strategies: DLion vs ps-asp on the same transient cluster and the same revocation draws,
  to the target accuracy.
- planner: for three deadlines, the planner's recommendation and how often full sim runs
  of it (fresh seeds, fresh revocation draws) meet the deadline.
- perf: the step model fitted on sim profiles and the checkpoint model fitted on real
  writes, with their errors on held-out configurations.
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from dlion.core.config import ExperimentConfig, load_config, with_changes
from dlion.core.errors import DlionError
from dlion.report import write_json_atomic
from dlion.transient.catalog import Catalog
from dlion.transient.perf import (
    STEP_FEATURES,
    fit_checkpoint_model,
    fit_step_model,
    measure_checkpoint,
    profile_step,
    relative_errors,
)
from dlion.transient.plan import PlanRequest, make_plan
from dlion.transient.profile import progress_bar
from dlion.transient.report import plan_record, plot_frontier
from dlion.transient.runs import Candidate, run_transient
from dlion.transient.spec import TransientSpec


@dataclass(frozen=True)
class BenchSpec:
    scenario: str = "homogeneous"  # digits/mlp: small enough for a 2-core machine
    instance: str = "gcp-n1-4-k80"  # the papers ran on GCP K80s
    workers: int = 8
    seeds: int = 10
    epochs: int = 20  # the same work for the 1-worker and the n-worker run (paper part)
    target_acc: float = 0.93  # strategies and planner parts
    max_time: float = 30.0  # sim seconds (x time_scale real)
    lr_grid: tuple[float, ...] = (0.05, 0.02, 0.01, 0.005)  # per-update learning rates
    deadlines_h: tuple[float, ...] = (0.45, 0.7, 3.0)  # RESULTS.md 8c
    eval_every_s: float = 0.02  # sim s between evaluations: 1.2 real minutes at time_scale 3600
    profile_seeds: int = 5  # training seeds per planner profile (its view of training noise)
    plan_counts: tuple[int, ...] = (2, 4, 8)  # a lone transient worker has no peer to hold
    # the model in the sim (the real system would restore from the checkpoint store)
    plan_draws: int = 300
    confidence: float = 0.9
    overrides: tuple[str, ...] = field(default_factory=tuple)


def _base(b: BenchSpec, strategy: str, lr: float) -> ExperimentConfig:
    return load_config(
        b.scenario,
        [
            f"strategy.name={strategy}",
            "strategy.options={}",
            f"train.lr={lr}",
            f"train.target_acc={b.target_acc}",
            f"train.max_time={b.max_time}",
            f"evaluation.every_s={b.eval_every_s}",
            *b.overrides,
        ],
    )


def _fixed_work(cfg: ExperimentConfig, n: int, epochs: int, train_size: int) -> ExperimentConfig:
    """Stop after `epochs` passes over the data in total, however many workers share them."""
    per_worker = math.ceil(epochs * train_size / (n * cfg.train.batch_per_worker))
    return with_changes(cfg, [f"train.max_iterations={per_worker}", "train.stop_at_target=false"])


def _check_done(summary: dict[str, Any], max_time: float) -> dict[str, Any]:
    """A fixed-work run must end by its iteration cap, not by the time limit."""
    if summary["time_s"] >= max_time:
        raise DlionError(
            f"{summary['candidate']} seed {summary['seed']}: the work did not finish within "
            f"train.max_time={max_time} sim s; raise it with --set train.max_time=..."
        )
    return summary


def _train_size(cfg: ExperimentConfig) -> int:
    from dlion.training.experiment import prepare

    return len(prepare(cfg, 1).train)


def _stats(values: Sequence[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def _row(summary: dict[str, Any], spec: TransientSpec) -> dict[str, Any]:
    tta = summary["tta_s"]
    return {
        "candidate": summary["candidate"],
        "strategy": summary["strategy"],
        "seed": summary["seed"],
        "time_h": summary["time_s"] * spec.time_scale / 3600,
        "tta_h": None if tta is None else tta * spec.time_scale / 3600,
        "final_acc": summary["final_acc"],
        "usd": summary["cost"]["usd"],
        "instance_hours": summary["cost"]["instance_hours"],
        "revocations": summary["cost"]["revocations"],
        # Rank 0 holds the parameter server role: its revocation moves the role.
        "server_revocations": sum(
            m["rank"] == 0 and m["event"] in ("leave", "crash") for m in summary["membership"]
        ),
        "iterations": summary["iterations"],
    }


class _Runner:
    """Runs with one shared progress bar."""

    def __init__(self, total: int, progress: bool) -> None:
        self._ctx = progress_bar(total, "transient bench", progress)
        self.bar = self._ctx.__enter__()
        self.task = self.bar.task_ids[0]

    def run(
        self, base: ExperimentConfig, cand: Candidate, spec: TransientSpec, seed: int, what: str
    ) -> dict[str, Any]:
        self.bar.update(self.task, now=f"{what}: {cand.label} seed {seed}")
        summary = run_transient(base, cand, spec, seed).summary
        self.bar.advance(self.task)
        return summary

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


def _tune_lr(
    runner: _Runner,
    b: BenchSpec,
    strategy: str,
    cand: Candidate,
    spec: TransientSpec,
    fixed_work: bool,
) -> tuple[float, list[dict[str, Any]]]:
    """The same search for every configuration: each lr of the grid on seed 0 without
    revocations (on-demand); fixed work: best final accuracy; else lowest TTA, then best
    final accuracy."""
    od = Candidate(cand.instance, cand.count, "on-demand")
    tried = []
    for lr in b.lr_grid:
        base = _base(b, strategy, lr)
        if fixed_work:
            base = _fixed_work(base, cand.count, b.epochs, _train_size(base))
        s = runner.run(base, od, spec, 0, f"lr {lr}")
        tried.append({"lr": lr, "tta_s": s["tta_s"], "final_acc": s["final_acc"]})

    def key(t: dict[str, Any]) -> tuple[float, float]:
        if fixed_work:
            return (-t["final_acc"], 0.0)
        return (t["tta_s"] if t["tta_s"] is not None else math.inf, -t["final_acc"])

    return min(tried, key=key)["lr"], tried


def paper_part(
    runner: _Runner, b: BenchSpec, catalog: Catalog, spec: TransientSpec
) -> dict[str, Any]:
    inst = catalog.get(b.instance)
    one = Candidate(inst, 1, "on-demand")
    many = Candidate(inst, b.workers, "transient")
    lr1, tried1 = _tune_lr(runner, b, "ps-asp", one, spec, fixed_work=True)
    lrn, triedn = _tune_lr(runner, b, "ps-asp", many, spec, fixed_work=True)
    base1 = _base(b, "ps-asp", lr1)
    base1 = _fixed_work(base1, 1, b.epochs, _train_size(base1))
    basen = _base(b, "ps-asp", lrn)
    basen = _fixed_work(basen, b.workers, b.epochs, _train_size(basen))
    pairs = []
    for seed in range(b.seeds):
        r1 = _row(_check_done(runner.run(base1, one, spec, seed, "paper"), b.max_time), spec)
        rn = _row(_check_done(runner.run(basen, many, spec, seed, "paper"), b.max_time), spec)
        pairs.append(
            {
                "seed": seed,
                "one": r1,
                "many": rn,
                "speedup": r1["time_h"] / rn["time_h"],
                "cost_saving": 1 - rn["usd"] / r1["usd"],
                "acc_gap_pp": 100 * (r1["final_acc"] - rn["final_acc"]),
            }
        )
    return {
        "instance": inst.name,
        "workers": b.workers,
        "epochs": b.epochs,
        "lr_one": lr1,
        "lr_many": lrn,
        "lr_search": {"one": tried1, "many": triedn},
        "pairs": pairs,
        "speedup": _stats([p["speedup"] for p in pairs]),
        "cost_saving": _stats([p["cost_saving"] for p in pairs]),
        "acc_one": _stats([p["one"]["final_acc"] for p in pairs]),
        "acc_many": _stats([p["many"]["final_acc"] for p in pairs]),
        "acc_gap_pp": _stats([p["acc_gap_pp"] for p in pairs]),
        "time_one_h": _stats([p["one"]["time_h"] for p in pairs]),
        "time_many_h": _stats([p["many"]["time_h"] for p in pairs]),
        "usd_one": _stats([p["one"]["usd"] for p in pairs]),
        "usd_many": _stats([p["many"]["usd"] for p in pairs]),
        "revocations": _stats([p["many"]["revocations"] for p in pairs]),
        "server_revocations": sum(p["many"]["server_revocations"] for p in pairs),
        "published": {"speedup": 7.65, "cost_saving": 0.61, "acc_one": 0.931, "acc_many": 0.888},
    }


def strategies_part(
    runner: _Runner, b: BenchSpec, catalog: Catalog, spec: TransientSpec
) -> dict[str, Any]:
    cand = Candidate(catalog.get(b.instance), b.workers, "transient")
    out: dict[str, Any] = {"cluster": cand.label, "target_acc": b.target_acc, "strategies": {}}
    for strategy in ("ps-asp", "dlion"):
        lr, tried = _tune_lr(runner, b, strategy, cand, spec, fixed_work=False)
        base = _base(b, strategy, lr)
        rows = [_row(runner.run(base, cand, spec, s, strategy), spec) for s in range(b.seeds)]
        out["strategies"][strategy] = {
            "lr": lr,
            "lr_search": tried,
            "runs": rows,
            "tta_h": _stats([r["tta_h"] for r in rows]),
            "reached": sum(r["tta_h"] is not None for r in rows),
            "usd": _stats([r["usd"] for r in rows]),
            "final_acc": _stats([r["final_acc"] for r in rows]),
            "revocations": _stats([r["revocations"] for r in rows]),
        }
    return out


def planner_part(
    runner: _Runner,
    b: BenchSpec,
    catalog: Catalog,
    spec: TransientSpec,
    lr: float,
    out_dir: Path,
) -> dict[str, Any]:
    base = _base(b, "ps-asp", lr)
    results = []
    profiles = None  # one profile of the workload serves every deadline
    for deadline_h in b.deadlines_h:
        req = PlanRequest(
            goal="deadline",
            limit=deadline_h * 3600,
            counts=b.plan_counts,
            draws=b.plan_draws,
            confidence=b.confidence,
            profile_seeds=b.profile_seeds,
        )
        plan, profiles = make_plan(base, catalog, spec, req, progress=False, profiles=profiles)
        plot_frontier(plan, out_dir / f"frontier-{deadline_h:g}h.png", f"deadline {deadline_h} h")
        rec = plan.recommended
        entry: dict[str, Any] = {"deadline_h": deadline_h, "plan": plan_record(plan)}
        if rec is not None:
            # Fresh seeds: neither the profiles (0..2) nor the lr search (0) saw them.
            horizon = with_changes(
                base, [f"train.max_time={3 * deadline_h * 3600 / spec.time_scale}"]
            )
            rows = [
                _row(runner.run(horizon, rec.candidate, spec, 100 + s, "validate"), spec)
                for s in range(b.seeds)
            ]
            met = [r["tta_h"] is not None and r["tta_h"] <= deadline_h for r in rows]
            entry.update(
                recommended=rec.candidate.label,
                promised=plan.probability(rec),
                predicted_time_h=rec.mean_time_s / 3600,
                predicted_usd=rec.mean_cost,
                runs=rows,
                met=sum(met),
                met_share=sum(met) / len(met),
                sim_tta_h=_stats([r["tta_h"] for r in rows]),
                sim_usd=_stats([r["usd"] for r in rows]),
            )
        results.append(entry)
    return {"lr": lr, "deadlines": results}


def run_bench(
    b: BenchSpec,
    catalog: Catalog,
    spec: TransientSpec,
    out_dir: Path,
    parts: Sequence[str] = ("paper", "strategies", "planner"),
    *,
    progress: bool = True,
) -> dict[str, Any]:
    grid = len(b.lr_grid)
    total = 0
    if "paper" in parts:
        total += 2 * grid + 2 * b.seeds
    if "strategies" in parts:
        total += 2 * grid + 2 * b.seeds
    if "planner" in parts:
        total += (0 if "strategies" in parts else grid) + len(b.deadlines_h) * b.seeds
    runner = _Runner(total, progress)
    record: dict[str, Any] = {"spec": b.__dict__, "transient_spec": spec.model_dump()}
    try:
        if "paper" in parts:
            record["paper"] = paper_part(runner, b, catalog, spec)
            write_json_atomic(out_dir / "summary.json", record)
        if "strategies" in parts:
            record["strategies"] = strategies_part(runner, b, catalog, spec)
            write_json_atomic(out_dir / "summary.json", record)
        if "planner" in parts:
            if "strategies" in parts:
                lr = record["strategies"]["strategies"]["ps-asp"]["lr"]
            else:  # the same search the strategies part runs for ps-asp
                cand = Candidate(catalog.get(b.instance), b.workers, "transient")
                lr, _ = _tune_lr(runner, b, "ps-asp", cand, spec, fixed_work=False)
            record["planner"] = planner_part(runner, b, catalog, spec, lr, out_dir)
    finally:
        runner.close()
    write_json_atomic(out_dir / "summary.json", record)
    return record


# ----------------------------------------------------------------------------- perf


class _PerfSample(TypedDict):
    """One random configuration that the step model is profiled on."""

    capacity: float  # GFLOP/s per worker
    batch: int
    hidden: list[int]
    workers: int
    bandwidth: int  # Mb/s


def perf_bench(
    out_dir: Path,
    *,
    configs: int = 24,
    held_out: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Step model: random configurations (capacity, batch, model width, workers, bandwidth),
    profiled by short sim runs; fit on some, error on the others, and on an extrapolation
    split (fit on <= 4 workers, predict 8). Checkpoint model: real atomic safetensors writes
    of growing size on this machine; fit on some sizes, error on the others."""
    rng = random.Random(seed)
    samples: list[_PerfSample] = []
    for _ in range(configs):
        samples.append(
            {
                "capacity": rng.choice([0.05, 0.1, 0.2, 0.4, 0.8]),
                "batch": rng.choice([16, 32, 64]),
                "hidden": rng.choice([[64], [128, 64], [256, 128]]),
                "workers": rng.choice([1, 2, 4, 8]),
                "bandwidth": rng.choice([100, 1000, 10000]),
            }
        )
    profiles = []
    sizes = [2**k * 1_000_000 for k in range(9)]  # 1 MB .. 256 MB
    with progress_bar(configs + len(sizes), "perf profiles", progress) as bar:
        task = bar.task_ids[0]
        for i, smp in enumerate(samples):
            cfg = load_config(
                "homogeneous",
                [
                    "strategy.name=ps-asp",
                    f"cluster.workers.0.capacity_gflops={smp['capacity']}",
                    f"cluster.workers.0.count={smp['workers']}",
                    f"cluster.workers.0.nic_mbps={smp['bandwidth']}",
                    f"cluster.sites.0.intra_bandwidth_mbps={smp['bandwidth']}",
                    f"train.batch_per_worker={smp['batch']}",
                    f"model.hidden={smp['hidden']}",
                    f"name=perf-{i}",
                ],
            )
            bar.update(task, now=cfg.name)
            profiles.append(profile_step(cfg, 20))
            bar.advance(task)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            seconds = []
            for size in sizes:
                bar.update(task, now=f"checkpoint {size / 1e6:.2f} MB")
                seconds.append(measure_checkpoint(size, Path(tmp), repeats=5))
                bar.advance(task)
    order = list(range(configs))
    rng.shuffle(order)
    fit_idx, test_idx = order[held_out:], order[:held_out]
    model = fit_step_model([profiles[i] for i in fit_idx])
    test_err = relative_errors(model, [profiles[i] for i in test_idx])
    train_err = relative_errors(model, [profiles[i] for i in fit_idx])
    small = [i for i in range(configs) if samples[i]["workers"] <= 4]
    large = [i for i in range(configs) if samples[i]["workers"] == 8]
    extrap = fit_step_model([profiles[i] for i in small]) if len(small) >= 4 else None
    extrap_err = relative_errors(extrap, [profiles[i] for i in large]) if extrap and large else []
    ck_fit = [0, 2, 4, 6, 8]
    ck_test = [1, 3, 5, 7]
    ck = fit_checkpoint_model([sizes[i] for i in ck_fit], [seconds[i] for i in ck_fit])
    ck_err = [abs(ck.predict(sizes[i]) - seconds[i]) / seconds[i] for i in ck_test]
    record = {
        "step_model": {
            "features": list(STEP_FEATURES),
            "coef": list(model.coef),
            "fit_error": _stats(train_err),
            "held_out_error": _stats(test_err),
            "extrapolation_8_workers_error": _stats(extrap_err),
            "profiles": [
                {
                    **samples[i],
                    "step_s": p.step_s,
                    "predicted_s": model.predict(p.features),
                    "held_out": i in test_idx,
                }
                for i, p in enumerate(profiles)
            ],
        },
        "checkpoint_model": {
            "overhead_s": ck.overhead_s,
            "mb_per_s": ck.mb_per_s,
            "measured": [{"bytes": s, "seconds": t} for s, t in zip(sizes, seconds, strict=True)],
            "held_out_sizes": [sizes[i] for i in ck_test],
            "held_out_error": _stats(ck_err),
        },
    }
    write_json_atomic(out_dir / "perf.json", record)
    return record
