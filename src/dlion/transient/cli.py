"""`dlion plan` and `dlion transient catalog|perf|bench`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from dlion.cli.options import ForceOption, wide_console
from dlion.core.errors import BadInput, ConfigError
from dlion.core.outdir import default_dir, open_output

if TYPE_CHECKING:
    from dlion.transient.planner import Goal
    from dlion.transient.spec import TransientSpec

app = typer.Typer(
    help="Training on transient (preemptible) servers: catalog, performance model, benchmarks.",
    no_args_is_help=True,
    add_completion=False,
)
console = wide_console()


def _ints(value: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {value!r}") from None
    if not out:
        raise ConfigError(f"{what}: empty list")
    return out


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    out = [v.strip() for v in value.split(",") if v.strip()]
    return out or None


def _spec(time_scale: float | None, capacity_scale: float | None) -> TransientSpec:
    from dlion.transient.spec import TransientSpec

    fields: dict[str, float] = {}
    for name, value in (("time_scale", time_scale), ("capacity_scale", capacity_scale)):
        if value is not None:
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be > 0, got {value}")
            fields[name] = value
    return TransientSpec(**fields)


CatalogOpt = Annotated[
    str, typer.Option("--catalog", help="Catalog YAML path or shipped catalog name.")
]
TimeScaleOpt = Annotated[
    float | None, typer.Option(help="Real seconds per simulated second (default 3600).")
]
CapScaleOpt = Annotated[
    float | None, typer.Option(help="Sim GFLOP/s per effective real GFLOP/s (default 1e-3).")
]


def plan(
    config: Annotated[str, typer.Argument(help="Workload config: YAML path or scenario name.")],
    catalog: CatalogOpt = "default",
    deadline: Annotated[
        str | None, typer.Option(help="Time to reach the target: 90m, 2h, 1h30m, 3600s.")
    ] = None,
    budget: Annotated[str | None, typer.Option(help="Money to reach the target, USD.")] = None,
    types: Annotated[str | None, typer.Option(help="Comma-separated instance types.")] = None,
    counts: Annotated[str, typer.Option(help="Comma-separated worker counts.")] = "1,2,4,8",
    tiers: Annotated[str, typer.Option(help="transient, on-demand or both.")] = (
        "transient,on-demand"
    ),
    draws: Annotated[int, typer.Option(help="Monte Carlo revocation draws per cluster.")] = 200,
    confidence: Annotated[
        float, typer.Option(help="Probability the recommendation must reach.")
    ] = 0.9,
    profile_seeds: Annotated[int, typer.Option(help="Training seeds per profile.", min=2)] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the revocation draws.")] = 0,
    time_scale: TimeScaleOpt = None,
    capacity_scale: CapScaleOpt = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config field (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    force: ForceOption = False,
) -> None:
    """Choose instance type, count and tier for a deadline or a budget (Monte Carlo)."""
    from dlion.core.config import load_config
    from dlion.transient.catalog import load_catalog
    from dlion.transient.plan import PlanRequest, make_plan, write_plan
    from dlion.transient.planner import parse_budget, parse_duration
    from dlion.transient.report import goal_text, plan_table

    if (deadline is None) == (budget is None):
        raise BadInput("give exactly one of --deadline or --budget")
    goal: Goal
    if deadline is not None:
        goal, limit = "deadline", parse_duration(deadline)
    else:
        goal, limit = "budget", parse_budget(budget or "")
    cat = load_catalog(catalog)
    cfg = load_config(config, list(set_ or []))
    spec = _spec(time_scale, capacity_scale)
    req = PlanRequest(
        goal=goal,
        limit=limit,
        types=_names(types),
        counts=_ints(counts, "--counts"),
        tiers=_names(tiers) or [],
        draws=draws,
        confidence=confidence,
        seed=seed,
        profile_seeds=profile_seeds,
    )
    output = open_output(out or default_dir("plan", cfg.name), command="plan", force=force)
    with output.writing() as work:
        result, profiles = make_plan(cfg, cat, spec, req, progress=not quiet)
        title = f"{cfg.name}: to {cfg.train.target_acc:.1%}, {goal_text(result)}"
        paths = write_plan(result, profiles, work, title)
    console.print(plan_table(result, title))
    rec = result.recommended
    if rec is None:
        console.print(f"no candidate can meet the {goal_text(result)}")
    else:
        verdict = "" if result.meets_confidence else f" (below the asked {confidence:.0%})"
        console.print(
            f"recommended: [bold]{rec.candidate.label}[/], expected {rec.mean_time_s / 3600:.2f} h "
            f"and ${rec.mean_cost:.2f}, P(meet) = {result.probability(rec):.2f}{verdict}"
        )
    console.print(f"wrote {', '.join(str(output.path / p.name) for p in paths)}")


@app.command("catalog")
def show_catalog(catalog: CatalogOpt = "default") -> None:
    """List a catalog's instance types: capacity, prices, revocation model."""
    from dlion.transient.catalog import load_catalog

    cat = load_catalog(catalog)
    table = Table(title=f"catalog {cat.name}: {cat.description}")
    for col in ("type", "GPU", "GFLOP/s (eff.)", "$/h on-demand", "$/h transient", "startup s"):
        table.add_column(col)
    table.add_column("revocation")
    for i in cat.instances:
        r = i.revocation
        law = {
            "exponential": f"exp(mean {r.mean_lifetime_h} h)",
            "weibull": f"weibull(k={r.shape}, {r.scale_h} h)",
            "none": "never",
        }[r.distribution]
        cap = f", max {r.max_lifetime_h} h" if r.max_lifetime_h else ""
        table.add_row(
            i.name,
            i.gpu,
            f"{i.capacity_gflops:.0f}",
            f"{i.on_demand_per_h:.4g}",
            f"{i.transient_per_h:.4g}",
            f"{i.startup_s:g}",
            f"{law}{cap}, notice {r.warning_s:g} s",
        )
    console.print(table)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/transient-bench"),
    catalog: CatalogOpt = "default",
    parts: Annotated[
        str, typer.Option(help="Comma-separated: paper, strategies, planner.")
    ] = "paper,strategies,planner",
    instance: Annotated[str, typer.Option(help="Instance type of the comparisons.")] = (
        "gcp-n1-4-k80"
    ),
    workers: Annotated[int, typer.Option(min=2, help="Transient workers.")] = 8,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per configuration.")] = 10,
    epochs: Annotated[int, typer.Option(min=1, help="Work of the paper comparison.")] = 20,
    deadlines: Annotated[str, typer.Option(help="Planner deadlines in hours.")] = "0.45,0.7,3",
    time_scale: TimeScaleOpt = None,
    capacity_scale: CapScaleOpt = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override for every run (repeatable).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    force: ForceOption = False,
) -> None:
    """The issue-6 numbers: paper comparison, DLion vs ps-asp, planner vs full sim runs."""
    from dlion.transient.bench import BenchSpec, run_bench
    from dlion.transient.catalog import load_catalog
    from dlion.transient.summary import bench_markdown

    chosen = _names(parts) or []
    for p in chosen:
        if p not in ("paper", "strategies", "planner"):
            raise ConfigError(f"--parts: unknown part {p!r} (paper, strategies, planner)")
    try:
        hours = tuple(float(h) for h in deadlines.split(","))
    except ValueError:
        raise ConfigError(
            f"--deadlines: expected hours like 0.75,2.25,4, got {deadlines!r}"
        ) from None
    if not hours or min(hours) <= 0:
        raise ConfigError(f"--deadlines: must be positive hours, got {deadlines!r}")
    cat = load_catalog(catalog)
    cat.get(instance)
    spec = BenchSpec(
        instance=instance,
        workers=workers,
        seeds=seeds,
        epochs=epochs,
        deadlines_h=hours,
        overrides=tuple(set_ or []),
    )
    output = open_output(out, command="transient-bench", force=force, reuse=True)
    with output.writing() as work:
        record = run_bench(
            spec, cat, _spec(time_scale, capacity_scale), work, chosen, progress=not quiet
        )
        text = bench_markdown(record)
        (work / "report.md").write_text(text)
    console.print(text, markup=False, highlight=False)
    console.print(f"wrote {out}/summary.json, report.md")


@app.command()
def perf(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/transient-perf"),
    configs: Annotated[int, typer.Option(min=6, help="Profiled configurations.")] = 24,
    held_out: Annotated[int, typer.Option(min=1, help="Configurations kept out of the fit.")] = 8,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    force: ForceOption = False,
) -> None:
    """Fit the step-time and checkpoint-time models; report their held-out errors."""
    from dlion.transient.bench import perf_bench
    from dlion.transient.summary import perf_markdown

    if held_out >= configs - 3:
        raise ConfigError(f"--held-out: leave at least 4 configurations to fit, got {held_out}")
    output = open_output(out, command="transient-perf", force=force)
    with output.writing() as work:
        record = perf_bench(work, configs=configs, held_out=held_out, progress=not quiet)
        text = perf_markdown(record)
        (work / "perf.md").write_text(text)
    console.print(text, markup=False, highlight=False)
    console.print(f"wrote {out}/perf.json, perf.md")
