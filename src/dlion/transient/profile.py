"""Profiles the planner needs, from sim runs without revocations: the iterations a cluster
of n workers of a type needs to reach the target, and step times to fit the performance
model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dlion.core.config import ExperimentConfig, with_changes
from dlion.engines.sim import run_sim
from dlion.transient.catalog import InstanceType
from dlion.transient.perf import StepModel, StepProfile, fit_step_model, profile_step, step_features
from dlion.transient.planner import Workload
from dlion.transient.runs import cluster_config
from dlion.transient.spec import TransientSpec

STEP_PROBE_ITERATIONS = 20  # long enough that the first iteration's pipeline fill averages out


@contextmanager
def progress_bar(total: int, what: str, enabled: bool) -> Iterator[Progress]:
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[now]}"),
        disable=not enabled,
    )
    bar.add_task(what, total=total, now="")
    with bar:
        yield bar


def iterations_to_target(
    base: ExperimentConfig, inst: InstanceType, n: int, spec: TransientSpec, seed: int
) -> float | None:
    """Mean per-worker iterations at the first evaluation that reaches the target, on n
    on-demand workers of `inst` (None: not within train.max_time)."""
    cfg = with_changes(
        cluster_config(base, inst, n, spec), ["train.stop_at_target=true", f"train.seed={seed}"]
    )
    result = run_sim(cfg, progress=False)
    for p in result.points:
        if p.mean_acc >= cfg.train.target_acc:
            return float(p.iteration)
    return None


@dataclass(frozen=True)
class Profiles:
    # Per instance type with a distinct capacity, per worker count: iterations to target,
    # one per profiled training seed. Faster compute against the same links changes
    # staleness, so the iterations differ between types (validated in RESULTS.md 8c).
    iterations: dict[str, dict[int, list[float | None]]]
    steps: list[StepProfile]
    model: StepModel
    by_capacity: dict[float, str]  # capacity (GFLOP/s) -> the type profiled for it


def profile_workload(
    base: ExperimentConfig,
    types: Sequence[InstanceType],
    counts: Sequence[int],
    spec: TransientSpec,
    *,
    seeds: int = 3,
    progress: bool = True,
) -> Profiles:
    """For every distinct capacity among `types` and every count: iterations to target
    over `seeds` training seeds, and a step-time profile to fit the step model."""
    distinct: dict[float, InstanceType] = {}
    for inst in types:
        distinct.setdefault(inst.capacity_gflops, inst)
    counts = sorted(set(counts))
    total = len(counts) * len(distinct) * (seeds + 1)
    iterations: dict[str, dict[int, list[float | None]]] = {}
    steps: list[StepProfile] = []
    with progress_bar(total, "profiling", progress) as bar:
        task = bar.task_ids[0]
        for inst in distinct.values():
            iterations[inst.name] = {}
            for n in counts:
                runs = iterations[inst.name].setdefault(n, [])
                for seed in range(seeds):
                    bar.update(task, now=f"{n} x {inst.name} to target, seed {seed}")
                    runs.append(iterations_to_target(base, inst, n, spec, seed))
                    bar.advance(task)
                bar.update(task, now=f"{n} x {inst.name} step time")
                steps.append(
                    profile_step(cluster_config(base, inst, n, spec), STEP_PROBE_ITERATIONS)
                )
                bar.advance(task)
    if len(steps) < 2:
        # One count and one capacity: no fit possible; scale the physical estimate so it
        # reproduces the one measured step.
        only = steps[0]
        physical = float(sum(only.features.vector()[:3]))
        ratio = only.step_s / physical if physical > 0 else 0.0
        model = StepModel((ratio, ratio, ratio, 0.0 if physical > 0 else only.step_s))
    else:
        model = fit_step_model(steps)
    names = {cap: inst.name for cap, inst in distinct.items()}
    return Profiles(iterations, steps, model, names)


def workload(profiles: Profiles, base: ExperimentConfig, spec: TransientSpec) -> Workload:
    """The planner's view: iterations to target by type (capacity) and profiled count, and
    the fitted model's step time in real seconds."""

    def iterations(inst: InstanceType, n: int) -> list[float | None]:
        name = profiles.by_capacity.get(inst.capacity_gflops)
        if name is None or n not in profiles.iterations[name]:
            raise KeyError(f"no iteration profile for {n} x {inst.name}")
        return profiles.iterations[name][n]

    def step_s(inst: InstanceType, n: int) -> float:
        features = step_features(cluster_config(base, inst, n, spec))
        return max(profiles.model.predict(features), 1e-9) * spec.time_scale

    return Workload(iterations, step_s)
