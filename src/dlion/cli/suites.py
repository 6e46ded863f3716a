"""Benchmark suites: every (scenario, variant, strategy, seed) side by side, with a report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from dlion.cluster.topology import Cluster
from dlion.core.config import (
    ExperimentConfig,
    _Strict,
    check_chosen,
    config_from_dict,
    load_config,
    parse_yaml_mapping,
    read_source,
    validated,
    with_changes,
)
from dlion.core.outdir import same_config
from dlion.engines.sim import run_sim
from dlion.report import (
    aggregate,
    bench_table,
    mean_curve,
    plot_accuracy_vs_time,
    write_json_atomic,
    write_report,
)

IDEAL = "ideal"


class SuiteStrategy(_Strict):
    label: str = Field(description="Name in tables and plots.")
    strategy: str = Field(description="Registered strategy name.")
    options: dict[str, Any] = Field(default_factory=dict, description="strategy.options.")
    set: list[str] = Field(
        default_factory=list,
        description="Overrides for this strategy's runs only (e.g. train.optimizer=adamw for "
        "DiLoCo's inner optimizer), applied after the suite's.",
    )
    grid: list[dict[str, float | int | str]] | None = Field(
        None,
        description="This strategy's own search: candidate settings, each a mapping of "
        "config paths to values (e.g. {train.lr: 0.003, strategy.options.H: 10}); as many "
        "candidates as lr_search.grid has rates (the same budget for every strategy). "
        "Default: lr_search.grid's learning rates.",
    )


class LrSearch(_Strict):
    """The same learning-rate search for every strategy: each grid value on one scenario,
    pick the lowest mean TTA (all seeds reaching the target), else the best final accuracy."""

    scenario: str = Field("homogeneous", description="Where the search runs.")
    grid: list[float] = Field(min_length=1, description="Learning rates to try.")
    seeds: int = Field(1, ge=1, description="Seeds per grid value.")
    first_seed: int = Field(
        0,
        ge=0,
        description="Seeds first_seed .. first_seed+seeds-1: pilot seeds apart from the "
        "bench's own (0, 1, ...) keep the search from choosing on the runs it reports.",
    )
    extend: int = Field(
        3,
        ge=0,
        description="A best learning rate at the edge of the tried ones adds the next rate "
        "beyond it (one grid step further), up to this many times per strategy, so the "
        "choice is bracketed by worse rates on both sides (0: the grid as written).",
    )


class Suite(_Strict):
    name: str
    description: str = ""
    scenarios: list[str] = Field(min_length=1, description="Shipped names or YAML paths.")
    variants: dict[str, list[str]] = Field(
        default_factory=lambda: {"default": list[str]()},
        min_length=1,
        description="Named lists of --set overrides (e.g. one per dataset) applied to each "
        "scenario; a run's scenario key is 'scenario/variant' when there are several.",
    )
    strategies: list[SuiteStrategy] = Field(min_length=1)
    seeds: int = Field(1, ge=1)
    ideal: bool = Field(
        True,
        description="Also run the ideal bound: one worker with the cluster's summed "
        "compute and free communication.",
    )
    set: list[str] = Field(default_factory=list, description="Overrides for every run.")
    lr_search: LrSearch | None = Field(
        None, description="Tune train.lr per strategy and variant before the runs."
    )

    @model_validator(mode="after")
    def _same_search_budget(self) -> Suite:
        for s in self.strategies:
            if s.grid is None:
                continue
            if self.lr_search is None:
                raise ValueError(f"strategies: {s.label} has a grid but the suite no lr_search")
            if len(s.grid) != len(self.lr_search.grid) or not all(s.grid):
                raise ValueError(
                    f"strategies: {s.label}'s grid has {len(s.grid)} candidates, "
                    f"lr_search.grid {len(self.lr_search.grid)}: every strategy gets the same "
                    "search budget (and no candidate may be empty)"
                )
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> Suite:
        labels = [s.label for s in self.strategies]
        for label in labels:
            if labels.count(label) > 1 or (label == IDEAL and self.ideal):
                raise ValueError(
                    f"strategies: label {label!r} is used twice (labels name rows and run "
                    "directories; give each strategy its own)"
                )
        return self


def load_suite(source: str) -> Suite:
    text = read_source(source, "suites", "suite")
    return validated(Suite, parse_yaml_mapping(text, source), source)


def ideal_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """One virtual worker with the cluster's summed compute, the global batch, no network.

    Its step is that of the cluster perfectly balanced: with step time a_i + b_i F / c_i
    per worker, equal times for sum b_i = G give T = G F / C + sum c_i a_i / C (wdb.py), so
    the summed worker's step overhead is the capacity-weighted mean of the workers'. Its
    vector work (the optimizer step, once per step) is rated by the speed rule at the
    cluster's per-worker batch (`engine.vector_cost_batch`), as a worker of capacity C in
    that cluster: rated at the global batch, the host's fixed step cost would weigh less
    and the summed worker would pay vector work 3.4x slower than its capacity says on
    compute-hetero (slower than the fastest real worker; RESULTS.md section 14g).

    With capacity traces the summed capacity follows them (a piecewise-constant sum of
    the workers' traces); bandwidth traces and membership events do not apply to it
    (no network; every worker's compute counts for the whole run)."""
    workers = cfg.cluster.workers
    total = sum(w.capacity_gflops * w.count for w in workers)
    count = sum(w.count for w in workers)
    raw = cfg.model_dump(mode="json")
    overhead_ms = sum(w.capacity_gflops * w.count * w.step_overhead_ms for w in workers) / total
    raw["cluster"]["workers"] = [
        {"site": workers[0].site, "capacity_gflops": total, "step_overhead_ms": overhead_ms}
    ]
    raw["engine"]["vector_cost_batch"] = cfg.engine.vector_cost_batch or cfg.train.batch_per_worker
    raw["cluster"]["links"] = []
    raw["train"]["batch_per_worker"] = cfg.train.batch_per_worker * count
    raw["strategy"] = {"name": "allreduce", "options": {}}
    raw["dynamics"] = {}
    if cfg.dynamics.capacity:
        cluster = Cluster.from_config(cfg.cluster).with_dynamics(cfg.dynamics, cfg.train.max_time)
        changes = sorted({0.0, *cluster.capacity_change_times()})
        points = [[t, sum(cluster.capacity(r, t) for r in range(count)) / 1e9] for t in changes]
        raw["dynamics"] = {"capacity": [{"worker": 0, "absolute": True, "points": points}]}
    return ExperimentConfig.model_validate(raw)


def run_suite(
    suite: Suite,
    out_dir: Path,
    *,
    strategies: list[str] | None = None,
    scenarios: list[str] | None = None,
    seeds: int | None = None,
    extra_set: list[str] | None = None,
    progress: bool = True,
    force: bool = False,
) -> tuple[list[dict[str, Any]], list[Path], dict[str, Any]]:
    """Run the suite; finished runs found in out_dir are reused, not rerun, when their
    whole resolved config matches; a finished run with another config is replaced only
    with `force` (else BadInput before any run).

    Returns the run summaries, the plots, and the learning-rate search's choices."""
    chosen = [s for s in suite.strategies if strategies is None or s.label in strategies]
    check_chosen("--strategies", strategies, [s.label for s in suite.strategies], IDEAL)
    names = [s for s in suite.scenarios if scenarios is None or s in scenarios]
    check_chosen("--scenarios", scenarios, suite.scenarios)
    with_ideal = suite.ideal and (strategies is None or IDEAL in strategies)
    n_seeds = seeds or suite.seeds
    # Every config is built (and so validated) and every reuse decided before any run.
    jobs: list[tuple[str, str, str, int, ExperimentConfig, Path]] = []
    targets: dict[str, float] = {}
    for scenario in names:
        for variant, variant_set in suite.variants.items():
            key = scenario if len(suite.variants) == 1 else f"{scenario}/{variant}"
            base = load_config(scenario, [*suite.set, *variant_set, *(extra_set or [])])
            base = with_changes(base, [f"name={key}"])
            targets[key] = base.train.target_acc
            for label, cfg in _plan(suite, base, chosen, with_ideal):
                for seed in range(n_seeds):
                    run_cfg = with_changes(cfg, [f"train.seed={seed}"])
                    run_dir = out_dir / "runs" / key.replace("/", "__") / label / f"seed{seed}"
                    jobs.append((key, variant, label, seed, run_cfg, run_dir))
    searched = _searched_labels(suite, chosen, with_ideal)
    for _, _, label, _, run_cfg, run_dir in jobs:
        if label not in searched:  # a searched rate is known only after the search
            check_reuse(run_cfg, run_dir, force)
    chosen_lr = search_learning_rates(
        suite, out_dir, chosen, with_ideal, list(extra_set or []), progress, force
    )
    runs: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[list[tuple[float, float]]]]] = {}
    for done, (key, variant, label, seed, run_cfg, run_dir) in enumerate(jobs, start=1):
        if label in chosen_lr.get(variant, {}):
            run_cfg = with_changes(run_cfg, chosen_lr[variant][label]["set"])
        summary, points = _run_or_reuse(
            run_cfg,
            run_dir,
            label,
            progress,
            f"[{done}/{len(jobs)}] {key} {label} seed {seed}",
            force,
        )
        runs.append(summary)
        curves.setdefault(key, {}).setdefault(label, []).append(points)
    plots: list[Path] = []
    for key, by_label in curves.items():
        mean_curves = {label: mean_curve(cs) for label, cs in by_label.items()}
        path = out_dir / f"accuracy_vs_time_{key.replace('/', '__')}.png"
        plot_accuracy_vs_time(
            mean_curves, path, title=f"{suite.name}: {key} (mean over seeds)", target=targets[key]
        )
        plots.append(path)
    write_json_atomic(
        out_dir / "summary.json", {"suite": suite.name, "runs": runs, "lr_search": chosen_lr}
    )
    return runs, plots, chosen_lr


def _plan(
    suite: Suite, base: ExperimentConfig, chosen: list[SuiteStrategy], with_ideal: bool
) -> list[tuple[str, ExperimentConfig]]:
    """(label, config) for every strategy of the suite on one scenario config."""
    plan: list[tuple[str, ExperimentConfig]] = []
    for s in chosen:
        raw = base.model_dump(mode="json")
        raw["strategy"] = {"name": s.strategy, "options": dict(s.options)}
        cfg = config_from_dict(raw, f"{suite.name}: {s.label}")
        plan.append((s.label, with_changes(cfg, s.set) if s.set else cfg))
    if with_ideal:
        plan.append((IDEAL, ideal_config(base)))
    return plan


def _run_or_reuse(
    cfg: ExperimentConfig,
    run_dir: Path,
    label: str,
    progress: bool,
    description: str,
    force: bool = False,
) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    """Run one configuration, or reuse its finished result from an earlier bench."""
    summary = check_reuse(cfg, run_dir, force)
    if summary is not None:
        return summary, _curve_from_metrics(run_dir)
    # Whatever is there is not a finished run of this config (torn, or replaced with
    # --force): it goes first, so that no old summary sits beside the new metrics.
    shutil.rmtree(run_dir, ignore_errors=True)
    result = run_sim(cfg, out_dir=run_dir, label=label, progress=progress, description=description)
    return result.summary, [(p.t, p.mean_acc) for p in result.points]


def check_reuse(cfg: ExperimentConfig, run_dir: Path, force: bool) -> dict[str, Any] | None:
    """The summary of run_dir if it holds a finished run of exactly `cfg` (reuse it), else
    None (run it). A finished run of another config is BadInput unless `force`."""
    summary = _finished_summary(run_dir)
    if summary is None or not same_config(run_dir, cfg.model_dump(mode="json"), force):
        return None
    return summary


def _searched_labels(suite: Suite, chosen: list[SuiteStrategy], with_ideal: bool) -> set[str]:
    if suite.lr_search is None:
        return set()
    return {s.label for s in chosen} | ({IDEAL} if with_ideal else set())


def search_learning_rates(
    suite: Suite,
    out_dir: Path,
    chosen: list[SuiteStrategy],
    with_ideal: bool,
    extra_set: list[str],
    progress: bool,
    force: bool = False,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{variant: {label: {"lr": chosen rate, "set": chosen overrides, "grid": {candidate:
    [tta or None per seed]}}}}. A candidate is a learning rate ("0.05") or, for a strategy
    with its own grid, its overrides joined ("train.lr=0.003 strategy.options.H=10")."""
    search = suite.lr_search
    if search is None:
        return {}
    grids = {s.label: s.grid for s in chosen}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, variant_set in suite.variants.items():
        base = load_config(search.scenario, [*suite.set, *variant_set, *extra_set])
        for label, cfg in _plan(suite, base, chosen, with_ideal):
            out.setdefault(variant, {})[label] = search_one(
                cfg,
                candidate_overrides(grids.get(label), search.grid),
                own_grid=grids.get(label) is not None,
                search=search,
                where=out_dir / "lr-search" / variant / label,
                label=label,
                progress=progress,
                force=force,
            )
    return out


def search_one(
    cfg: ExperimentConfig,
    candidates: dict[str, list[str]],
    *,
    own_grid: bool,
    search: LrSearch,
    where: Path,
    label: str,
    progress: bool,
    force: bool,
) -> dict[str, Any]:
    """One strategy's search: every candidate on every pilot seed, then the grid extended
    past its edge while the best candidate sits there (`search.extend` times at most)."""
    grid: dict[str, list[dict[str, Any]]] = {}

    def try_candidate(key: str) -> None:
        for seed in range(search.first_seed, search.first_seed + search.seeds):
            run_cfg = with_changes(cfg, [*candidates[key], f"train.seed={seed}"])
            # Run directories: lr<rate> (as earlier benches named them), c<i> otherwise.
            name = f"c{list(candidates).index(key)}" if own_grid else f"lr{key}"
            desc = f"search {label} {key} seed {seed}"
            summary, _ = _run_or_reuse(
                run_cfg, where / name / f"seed{seed}", label, progress, desc, force
            )
            grid.setdefault(key, []).append(summary)

    for key in list(candidates):
        try_candidate(key)
    extended: list[str] = []
    for _ in range(search.extend):
        step = edge_extension(candidates, pick_best(grid), own_grid)
        if step is None:
            break
        key, overrides = step
        candidates[key] = overrides
        extended.append(key)
        try_candidate(key)
    best = pick_best(grid)
    return {
        "lr": with_changes(cfg, candidates[best]).train.lr,
        "set": candidates[best],
        "grid": {key: [r["tta_s"] for r in rs] for key, rs in grid.items()},
        "extended": extended,
        "at_edge": edge_extension(candidates, best, own_grid) is not None,
    }


def _lr_of(overrides: list[str]) -> float | None:
    for item in overrides:
        if item.startswith("train.lr="):
            return float(item.split("=", 1)[1])
    return None


def edge_extension(
    candidates: dict[str, list[str]], best: str, own_grid: bool
) -> tuple[str, list[str]] | None:
    """The candidate one grid step beyond `best` when its learning rate is the highest (or
    lowest) of all tried, else None (the choice is bracketed).

    The step is the ratio of the two outermost distinct rates on that side (a geometric
    grid continues geometrically); the new candidate keeps `best`'s other overrides. A
    grid of one rate, a candidate without train.lr, or a rate already tried gives None."""
    lr = _lr_of(candidates[best])
    rates = sorted({r for r in map(_lr_of, candidates.values()) if r is not None})
    if lr is None or len(rates) < 2:
        return None
    if lr == rates[-1]:
        new = lr * rates[-1] / rates[-2]
    elif lr == rates[0]:
        new = lr * rates[0] / rates[1]
    else:
        return None
    new = float(f"{new:.3g}")
    if new in rates:
        return None
    overrides = [item for item in candidates[best] if not item.startswith("train.lr=")]
    overrides = [f"train.lr={new}", *overrides] if own_grid else [f"train.lr={new}"]
    key = " ".join(overrides) if own_grid else str(new)
    return key, overrides


def candidate_overrides(
    grid: list[dict[str, float | int | str]] | None, rates: list[float]
) -> dict[str, list[str]]:
    """The search candidates as {key: --set overrides}: the strategy's own grid, or the
    suite's learning rates (keys "0.05")."""
    if grid is None:
        return {str(lr): [f"train.lr={lr}"] for lr in rates}
    out = {}
    for candidate in grid:
        overrides = [f"{path}={value}" for path, value in candidate.items()]
        out[" ".join(overrides)] = overrides
    return out


def pick_best(grid: dict[str, list[dict[str, Any]]]) -> str:
    """Lowest mean TTA among the candidates every seed reached the target with; if none
    did, the highest mean final accuracy. Ties go to the first candidate in the grid."""
    reached = {
        lr: sum(r["tta_s"] for r in runs) / len(runs)
        for lr, runs in grid.items()
        if all(r["tta_s"] is not None for r in runs)
    }
    if reached:
        return min(reached, key=lambda lr: reached[lr])
    final = {lr: sum(r["final_acc"] for r in runs) / len(runs) for lr, runs in grid.items()}
    return max(final, key=lambda lr: final[lr])


def _finished_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn or unreadable summary means the run did not finish: rerun it
    return data if isinstance(data, dict) and "tta_s" in data else None


def _curve_from_metrics(run_dir: Path) -> list[tuple[float, float]]:
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "eval":
            points.append((float(event["t"]), float(event["mean_acc"])))
    return points


def report(
    suite: Suite,
    runs: list[dict[str, Any]],
    plots: list[Path],
    out_dir: Path,
    lr_search: dict[str, Any] | None = None,
) -> tuple[Any, list[Any]]:
    rows = aggregate(runs, baseline="allreduce")
    notes = ideal_notes(runs) + "\n\n" + sim_cost_notes(runs)
    if lr_search:
        notes += "\n\n" + lr_notes(suite, lr_search)
    write_report(
        out_dir / "report.md",
        rows,
        title=f"dlion bench {suite.name}",
        plots=[p.name for p in plots],
        notes=notes,
    )
    return bench_table(rows, f"dlion bench {suite.name}"), rows


def lr_notes(suite: Suite, lr_search: dict[str, Any]) -> str:
    """The learning-rate search as markdown: the grid, each rate's TTA, the choice."""
    search = suite.lr_search
    where = ""
    if search is not None:
        last = search.first_seed + search.seeds - 1
        where = f" on {search.scenario}, seeds {search.first_seed}-{last}"
    lines = [f"Hyperparameter search{where} (TTA per seed in simulated s; - = not reached):"]
    for variant, by_label in lr_search.items():
        for label, entry in by_label.items():
            tried = ", ".join(
                f"{key}: " + "/".join("-" if t is None else f"{t:.1f}" for t in ttas)
                for key, ttas in entry["grid"].items()
            )
            choice = " ".join(entry.get("set", [])) or f"train.lr={entry['lr']}"
            added = entry.get("extended") or []
            grown = f"; grid extended by {', '.join(added)}" if added else ""
            edge = "; STILL AT THE EDGE of the tried rates" if entry.get("at_edge") else ""
            lines.append(f"- {variant} {label}: chose {choice} ({tried}{grown}{edge})")
    return "\n".join(lines)


def sim_cost_notes(runs: list[dict[str, Any]]) -> str:
    """Simulator cost per (scenario, strategy): loop wall time over gradient wall time."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        if "wall_s" in run and run.get("compute_wall_s"):
            groups.setdefault((run["scenario"], run["strategy"]), []).append(run)
    lines = [
        "Simulator cost (wall seconds, mean over seeds; ratio = loop wall / gradient wall):",
        "",
        "| scenario | strategy | loop wall (s) | gradients (s) | evaluation (s) | ratio "
        "| ratio without evaluation |",
        "|---|---|---|---|---|---|---|",
    ]
    for (scenario, strategy), group in groups.items():
        wall = sum(r["wall_s"] for r in group) / len(group)
        grads = sum(r["compute_wall_s"] for r in group) / len(group)
        evals = sum(r.get("eval_wall_s", 0.0) for r in group) / len(group)
        lines.append(
            f"| {scenario} | {strategy} | {wall:.2f} | {grads:.2f} | {evals:.2f} "
            f"| {wall / grads:.2f} | {(wall - evals) / grads:.2f} |"
        )
    return "\n".join(lines)


def ideal_notes(runs: list[dict[str, Any]]) -> str:
    """TTA of each strategy relative to the ideal bound, per scenario (mean over seeds)."""
    rows = aggregate(runs, baseline=IDEAL)
    lines = []
    for row in rows:
        if row.strategy == IDEAL or row.speedup_vs_baseline is None:
            continue
        ratio = 1 / row.speedup_vs_baseline
        lines.append(f"- {row.scenario}: {row.strategy} TTA = {ratio:.2f}x the ideal bound")
    head = (
        "TTA relative to the ideal bound, the synchronous-SGD bound: one worker with the "
        "cluster's summed compute, the global batch and a free network, its learning rate "
        "searched like every strategy's (lower is better, 1.00 = the bound; asynchronous "
        "methods can legitimately approach or pass it):"
    )
    return head + "\n" + "\n".join(lines)
