"""`dlion plan`: profile the workload, evaluate every candidate, recommend, write outputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dlion.core.config import ExperimentConfig
from dlion.core.errors import ConfigError
from dlion.report import write_json_atomic
from dlion.transient.catalog import Catalog
from dlion.transient.planner import Goal, Plan, candidates, evaluate, recommend
from dlion.transient.profile import Profiles, profile_workload, progress_bar, workload
from dlion.transient.report import plan_record, plot_frontier
from dlion.transient.spec import TransientSpec


@dataclass(frozen=True)
class PlanRequest:
    goal: Goal
    limit: float  # deadline in real seconds, or budget in USD
    types: Sequence[str] | None = None  # None: every type in the catalog
    counts: Sequence[int] = (1, 2, 4, 8)
    tiers: Sequence[str] = ("transient", "on-demand")
    draws: int = 200
    confidence: float = 0.9
    seed: int = 0
    profile_seeds: int = 5


def make_plan(
    cfg: ExperimentConfig,
    catalog: Catalog,
    spec: TransientSpec,
    req: PlanRequest,
    *,
    progress: bool = True,
    profiles: Profiles | None = None,
) -> tuple[Plan, Profiles]:
    """Profile the workload (unless `profiles` from an earlier plan of the same workload,
    types and counts are given), evaluate every candidate, recommend one."""
    if req.draws < 1:
        raise ConfigError(f"--draws: must be >= 1, got {req.draws}")
    if not 0 < req.confidence <= 1:
        raise ConfigError(f"--confidence: must be in (0, 1], got {req.confidence}")
    cands = candidates(catalog, req.types, req.counts, req.tiers)
    types = list(dict.fromkeys(c.instance.name for c in cands))
    profiles = profiles or profile_workload(
        cfg,
        [catalog.get(t) for t in types],
        req.counts,
        spec,
        seeds=req.profile_seeds,
        progress=progress,
    )
    work = workload(profiles, cfg, spec)
    outcomes = []
    with progress_bar(len(cands), "Monte Carlo", progress) as bar:
        task = bar.task_ids[0]
        for cand in cands:
            bar.update(task, now=cand.label)
            outcomes.append(evaluate(cand, work, spec, req.draws, req.seed))
            bar.advance(task)
    return recommend(outcomes, req.goal, req.limit, req.confidence), profiles


def write_plan(plan: Plan, profiles: Profiles, out_dir: Path, title: str) -> list[Path]:
    record = plan_record(plan)
    record["profiles"] = {
        "iterations_to_target": {
            name: {str(n): v for n, v in by_count.items()}
            for name, by_count in profiles.iterations.items()
        },
        "step_model_coef": list(profiles.model.coef),
        "step_profiles": [
            {"label": p.label, "step_s": p.step_s, **p.features.__dict__} for p in profiles.steps
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "plan.json", record)
    png = plot_frontier(plan, out_dir / "frontier.png", title)
    return [out_dir / "plan.json", png]
