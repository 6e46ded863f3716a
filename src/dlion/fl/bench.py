"""`dlion bench fl`: FL algorithms side by side: accuracy at a time budget and TTA, with plots.

A suite YAML with `kind: fl` runs every (scenario, variant, algorithm, seed). Finished
runs found in the output directory are reused when their resolved config matches, so a
long suite can be split across commands (--scenarios, --strategies) or resumed after an
interruption.

Hyperparameter search (`search:` in the suite): every algorithm with a `grid` runs each
grid point on the search settings with the pilot seeds (distinct from the bench seeds:
checked), at the same time budget as the bench, and the point with the highest mean
accuracy at the budget (ties: shorter mean penalized TTA, then grid order) is used for
the bench; every grid has the same number of points, so no method gets a larger search.
An ablation row takes its method's choice with `tuned_as`. The choices and every pilot
score go to OUT/search.json.
"""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
from pathlib import Path
from typing import Any, Literal, TypedDict

import yaml
from pydantic import Field, model_validator

from dlion.core.config import _Strict, check_chosen, parse_yaml_mapping, read_source, validated
from dlion.core.errors import ConfigError
from dlion.fl.config import FLConfig, load_fl_config, with_fl_changes
from dlion.jobs.fl_sim import run_fl
from dlion.report import mean_curve, plot_accuracy_vs_time, write_json_atomic

REFERENCE = "fedpace"  # the algorithm every other one is compared with


class SuiteAlgorithm(_Strict):
    label: str = Field(description="Name in tables and plots.")
    algorithm: str = Field(description="Registered FL algorithm name.")
    options: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Option -> values searched (all combinations)."
    )
    tuned_as: str | None = Field(
        None, description="Use the options the search chose for this label (ablations)."
    )

    def grid_points(self) -> list[dict[str, Any]]:
        keys = sorted(self.grid)
        return [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(self.grid[k] for k in keys))
        ]


class SearchConfig(_Strict):
    seeds: list[int] = Field(min_length=1, description="Pilot seeds, none of them a bench seed.")
    settings: list[str] = Field(
        min_length=1, description="Settings searched on: 'scenario' or 'scenario/variant'."
    )
    points: int = Field(ge=1, description="Grid points per algorithm: the same for every one.")


class FLSuite(_Strict):
    kind: Literal["fl"]
    name: str
    description: str = ""
    scenarios: list[str] = Field(min_length=1, description="FL config names or YAML paths.")
    variants: dict[str, list[str]] = Field(
        default_factory=lambda: {"default": list[str]()},
        min_length=1,
        description="Named --set override lists applied to each scenario.",
    )
    algorithms: list[SuiteAlgorithm] = Field(min_length=1)
    seeds: int = Field(1, ge=1)
    set: list[str] = Field(default_factory=list, description="Overrides for every run.")
    search: SearchConfig | None = Field(None, description="Hyperparameter search (pilots).")

    @model_validator(mode="after")
    def _search_is_fair(self) -> FLSuite:
        labels = {a.label for a in self.algorithms}
        for a in self.algorithms:
            if a.tuned_as is not None and a.tuned_as not in labels:
                raise ValueError(f"{a.label}: tuned_as {a.tuned_as!r} is not a label here")
            if a.grid and self.search is None:
                raise ValueError(f"{a.label}: a grid needs a search section")
        if self.search is None:
            return self
        clash = sorted(set(self.search.seeds) & set(range(self.seeds)))
        if clash:
            raise ValueError(
                f"search.seeds {clash} are bench seeds (0..{self.seeds - 1}): pick others"
            )
        for a in self.algorithms:
            n = len(a.grid_points())
            if a.grid and n != self.search.points:
                raise ValueError(
                    f"{a.label}: grid has {n} points, search.points is {self.search.points} "
                    "(every algorithm gets the same search)"
                )
        keys = {
            s if len(self.variants) == 1 else f"{s}/{v}"
            for s in self.scenarios
            for v in self.variants
        }
        bad = sorted(set(self.search.settings) - keys)
        if bad:
            raise ValueError(f"search.settings {bad} not in the suite (have {sorted(keys)})")
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> FLSuite:
        labels = [a.label for a in self.algorithms]
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(
                    f"algorithms: label {label!r} is used twice (labels name rows and run "
                    "directories; give each algorithm its own)"
                )
        return self


def is_fl_suite(source: str) -> bool:
    try:
        raw = parse_yaml_mapping(read_source(source, "suites", "suite"), source)
    except ConfigError:
        return False
    return raw.get("kind") == "fl"


def load_fl_suite(source: str) -> FLSuite:
    text = read_source(source, "suites", "suite")
    return validated(FLSuite, parse_yaml_mapping(text, source), source)


def run_fl_suite(
    suite: FLSuite,
    out_dir: Path,
    *,
    labels: list[str] | None = None,
    scenarios: list[str] | None = None,
    seeds: int | None = None,
    extra_set: list[str] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[Path]]:
    chosen = [a for a in suite.algorithms if labels is None or a.label in labels]
    check_chosen("--strategies", labels, [a.label for a in suite.algorithms])
    check_chosen("--scenarios", scenarios, suite.scenarios)
    names = [s for s in suite.scenarios if scenarios is None or s in scenarios]
    n_seeds = seeds or suite.seeds
    total = len(names) * len(suite.variants) * len(chosen) * n_seeds
    out_dir.mkdir(parents=True, exist_ok=True)
    tuned = _search(suite, chosen, out_dir, extra_set or [], progress)
    runs: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[list[tuple[float, float]]]]] = {}
    targets: dict[str, float] = {}
    done = 0
    for scenario in names:
        for variant, variant_set in suite.variants.items():
            key = _key(suite, scenario, variant)
            base = _setting(suite, scenario, variant_set, key, extra_set or [])
            targets[key] = base.train.target_acc
            for algo in chosen:
                options = {**algo.options, **tuned.get(algo.tuned_as or algo.label, {})}
                for seed in range(n_seeds):
                    cfg = _config(base, algo.algorithm, options, seed)
                    run_dir = out_dir / "runs" / key.replace("/", "__") / algo.label / f"seed{seed}"
                    done += 1
                    desc = f"[{done}/{total}] {key} {algo.label} seed {seed}"
                    summary, points = _run_or_reuse(cfg, run_dir, algo.label, progress, desc)
                    runs.append(summary)
                    curves.setdefault(key, {}).setdefault(algo.label, []).append(points)
    plots: list[Path] = []
    for key, by_label in curves.items():
        path = out_dir / f"accuracy_vs_time_{key.replace('/', '__')}.png"
        plot_accuracy_vs_time(
            {label: mean_curve(cs) for label, cs in by_label.items()},
            path,
            title=f"{suite.name}: {key} (global model, mean over seeds)",
            target=targets[key],
        )
        plots.append(path)
    write_json_atomic(out_dir / "summary.json", {"suite": suite.name, "runs": runs})
    return runs, plots


def _key(suite: FLSuite, scenario: str, variant: str) -> str:
    return scenario if len(suite.variants) == 1 else f"{scenario}/{variant}"


def _setting(
    suite: FLSuite, scenario: str, variant_set: list[str], key: str, extra_set: list[str]
) -> FLConfig:
    # Accuracy is compared at the time budget, so no run stops at the target.
    overrides = [*suite.set, *variant_set, *extra_set, "train.stop_at_target=false"]
    return with_fl_changes(load_fl_config(scenario, overrides), [f"name={key}"])


def _config(base: FLConfig, algorithm: str, options: dict[str, Any], seed: int) -> FLConfig:
    raw = base.model_dump(mode="json")
    raw["algorithm"] = {"name": algorithm, "options": dict(options)}
    return FLConfig.model_validate({**raw, "train": {**raw["train"], "seed": seed}})


class _Scored(TypedDict):
    """One grid point of the search and its pilot runs' means."""

    options: dict[str, Any]
    acc: float
    tta_penalized: float


def _search(
    suite: FLSuite,
    chosen: list[SuiteAlgorithm],
    out_dir: Path,
    extra_set: list[str],
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """label -> the grid point with the best mean pilot accuracy (see the module doc)."""
    search = suite.search
    wanted = {a.tuned_as or a.label for a in chosen}
    searched = [a for a in suite.algorithms if a.grid and a.label in wanted]
    if search is None or not searched:
        return {}
    by_key = {
        _key(suite, s, v): (s, vs) for s in suite.scenarios for v, vs in suite.variants.items()
    }
    bases = {k: _setting(suite, *by_key[k], k, extra_set) for k in search.settings}
    total = len(searched) * search.points * len(bases) * len(search.seeds)
    done = 0
    tuned: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"seeds": search.seeds, "settings": search.settings, "algorithms": {}}
    for algo in searched:
        scored: list[_Scored] = []
        for n, point in enumerate(algo.grid_points()):
            accs, ttas = [], []
            for key, base in bases.items():
                for seed in search.seeds:
                    cfg = _config(base, algo.algorithm, {**algo.options, **point}, seed)
                    run_dir = (
                        out_dir
                        / "search"
                        / key.replace("/", "__")
                        / algo.label
                        / f"p{n}"
                        / f"seed{seed}"
                    )
                    done += 1
                    desc = f"[search {done}/{total}] {key} {algo.label} {point} seed {seed}"
                    summary, _ = _run_or_reuse(cfg, run_dir, algo.label, progress, desc)
                    accs.append(float(summary["final_acc"]))
                    tta = summary["tta_s"]
                    ttas.append(float(tta) if tta is not None else float(summary["time_s"]))
            scored.append(
                {
                    "options": point,
                    "acc": statistics.fmean(accs),
                    "tta_penalized": statistics.fmean(ttas),
                }
            )
        best = max(
            range(len(scored)), key=lambda j: (scored[j]["acc"], -scored[j]["tta_penalized"], -j)
        )
        tuned[algo.label] = scored[best]["options"]
        report["algorithms"][algo.label] = {"chosen": scored[best]["options"], "points": scored}
    write_json_atomic(out_dir / "search.json", report)
    return tuned


def _run_or_reuse(
    cfg: FLConfig, run_dir: Path, label: str, progress: bool, description: str
) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    # Only a finished run of exactly this config is reused (another grid point, a changed
    # scenario file: run again).
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        if saved == cfg.model_dump(mode="json"):
            summary = json.loads((run_dir / "summary.json").read_text())
            points = [
                (float(e["t"]), float(e["mean_acc"]))
                for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if e.get("event") == "eval"
            ]
            if isinstance(summary, dict) and "tta_s" in summary and points:
                return summary, points
    except (OSError, yaml.YAMLError, json.JSONDecodeError, KeyError, ValueError, TypeError):
        pass  # no run, or torn output: the run did not finish, run it again
    # Not a finished run of this config: cleared first, so that no old summary sits beside
    # the new metrics.
    shutil.rmtree(run_dir, ignore_errors=True)
    result = run_fl(cfg, out_dir=run_dir, label=label, progress=progress, description=description)
    return result.summary, [(p.t, p.mean_acc) for p in result.points]


# ----------------------------------------------------------------------------- report


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def aggregate_fl(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, algorithm): accuracy at the budget and TTA over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["strategy"]), []).append(r)
    rows = []
    for (scenario, label), group in groups.items():
        accs = [float(r["final_acc"]) for r in group]
        ttas = [float(r["tta_s"]) for r in group if r["tta_s"] is not None]
        rows.append(
            {
                "scenario": scenario,
                "algorithm": label,
                "seeds": len(group),
                "budget_s": max(float(r["time_s"]) for r in group),
                "target": group[0]["target_acc"],
                "acc_mean": _mean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "reached": len(ttas),
                # Mean TTA over the seeds that reached; with misses, also a penalized mean
                # that counts a miss as the budget (a lower bound on the true TTA).
                "tta_mean": _mean(ttas),
                "tta_penalized": _mean(
                    [
                        float(r["tta_s"]) if r["tta_s"] is not None else float(r["time_s"])
                        for r in group
                    ]
                ),
                "rejected": sum(int(r.get("rejected_messages", 0)) for r in group),
                "vanished": _mean([float(r.get("vanished", 0)) for r in group]),
            }
        )
    return rows


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reference (FedPace) vs each other algorithm per scenario: accuracy difference
    in points at the budget, and how much faster (1 - TTA_ref / TTA_other), on the
    penalized TTA (a miss counts as the budget) so a miss is never a win."""
    out = []
    ref = {r["scenario"]: r for r in rows if r["algorithm"] == REFERENCE}
    for r in rows:
        base = ref.get(r["scenario"])
        if base is None or r["algorithm"] == REFERENCE:
            continue
        faster = None
        if base["reached"] > 0 and r["tta_penalized"]:
            faster = 1 - base["tta_penalized"] / r["tta_penalized"]
        out.append(
            {
                "scenario": r["scenario"],
                "baseline": r["algorithm"],
                "acc_gain_pts": 100 * (base["acc_mean"] - r["acc_mean"]),
                "faster": faster,
                "baseline_reached": f"{r['reached']}/{r['seeds']}",
                "reference_reached": f"{base['reached']}/{base['seeds']}",
            }
        )
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def report_markdown(suite_name: str, rows: list[dict[str, Any]], plots: list[Path]) -> str:
    lines = [
        f"# dlion bench {suite_name}",
        "",
        "Accuracy of the global model at the time budget (mean ± std over seeds) and time to "
        "the target accuracy (simulated s; mean over the seeds that reached it; "
        "'penalized' counts a miss as the budget).",
        "",
        "| scenario | algorithm | acc @ budget (%) | TTA (s) | reached | TTA penalized (s) "
        "| rejected | vanished/run |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['algorithm']} | {100 * r['acc_mean']:.2f} ± "
            f"{100 * r['acc_std']:.2f} | {_fmt(r['tta_mean'], '.1f')} | "
            f"{r['reached']}/{r['seeds']} | {_fmt(r['tta_penalized'], '.1f')} | "
            f"{r['rejected']} | {_fmt(r['vanished'], '.0f')} |"
        )
    comp = comparisons(rows)
    if comp:
        lines += [
            "",
            f"## {REFERENCE} vs each baseline",
            "",
            f"Accuracy gain in percentage points at the budget; 'faster' = 1 - TTA_{REFERENCE} / "
            f"TTA_baseline on penalized TTAs (positive: {REFERENCE} is faster). Goal (issue 20): "
            "at least +1 point and 10% faster wherever the gap exceeds the seed spread.",
            "",
            f"| scenario | baseline | acc gain (pts) | faster | reached (baseline / {REFERENCE}) |",
            "|:---|:---|---:|---:|---:|",
        ]
        for c in comp:
            faster = "—" if c["faster"] is None else f"{100 * c['faster']:.1f}%"
            lines.append(
                f"| {c['scenario']} | {c['baseline']} | {c['acc_gain_pts']:+.2f} | {faster} "
                f"| {c['baseline_reached']} / {c['reference_reached']} |"
            )
    lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def search_markdown(search: dict[str, Any]) -> str:
    """The chosen hyperparameters and every pilot's score (OUT/search.json)."""
    lines = [
        "## chosen hyperparameters",
        "",
        f"Grid search on {', '.join(search['settings'])}, pilot seeds {search['seeds']}: the "
        "point with the best mean accuracy at the budget.",
        "",
        "| algorithm | chosen | pilot points: options -> acc (%), penalized TTA (s) |",
        "|:---|:---|:---|",
    ]
    for label, entry in search["algorithms"].items():
        points = "; ".join(
            f"{_options(p['options'])} -> {100 * p['acc']:.1f}, {p['tta_penalized']:.0f}"
            for p in entry["points"]
        )
        lines.append(f"| {label} | {_options(entry['chosen'])} | {points} |")
    return "\n".join(lines) + "\n"


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def write_fl_report(
    suite: FLSuite, runs: list[dict[str, Any]], plots: list[Path], out_dir: Path
) -> str:
    text = report_markdown(suite.name, aggregate_fl(runs), plots)
    search_path = out_dir / "search.json"
    if suite.search is not None and search_path.is_file():
        text += "\n" + search_markdown(json.loads(search_path.read_text()))
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    return text
