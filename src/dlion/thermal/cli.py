"""`dlion thermal`: simulate a policy, run a real command under one, benchmark, list profiles."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from dlion.cli.options import ForceOption, wide_console
from dlion.core.errors import ConfigError
from dlion.core.outdir import default_dir, open_output

app = typer.Typer(
    help="Heat-budget-aware DVFS (Sparta, EDGE '21): keep edge devices cool and fast.",
    no_args_is_help=True,
    add_completion=False,
)
console = wide_console()


def _check_policy(name: str) -> str:
    from dlion.thermal.config import POLICY_NAMES
    from dlion.thermal.errors import ThermalError

    if name not in POLICY_NAMES:
        raise ThermalError(f"--policy: unknown policy {name!r} (known: {', '.join(POLICY_NAMES)})")
    return name


def _split(value: str, what: str, cast: type = str) -> tuple[Any, ...]:
    from dlion.thermal.errors import ThermalError

    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        out = tuple(cast(v) for v in items)
    except ValueError:
        raise ThermalError(f"{what}: expected a comma-separated list, got {value!r}") from None
    if not out:
        raise ThermalError(f"{what}: empty list")
    return out


@app.command()
def simulate(
    config: Annotated[str, typer.Argument(help="Config YAML path or shipped profile name.")],
    policy: Annotated[
        str | None, typer.Option(help="sparta, performance, fixed-cap or reactive.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set ambient_c=35 (repeatable)."),
    ] = None,
    table: Annotated[
        Path | None, typer.Option(help="Sparta's start table JSON (default: user cache).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    force: ForceOption = False,
) -> None:
    """Run a workload on a simulated device; report time, share above threshold, peak, energy."""
    from dlion.report import write_json_atomic
    from dlion.thermal.config import load_thermal_config
    from dlion.thermal.plots import plot_temperature_frequency
    from dlion.thermal.sim import simulate as run_sim

    overrides = list(set_ or [])
    if policy is not None:
        overrides.append(f"policy.name={_check_policy(policy)}")
    if table is not None:
        overrides.append(f"policy.sparta.table_path={table}")
    cfg = load_thermal_config(config, overrides)
    target = out or default_dir("thermal", cfg.name, cfg.policy.name, f"seed{cfg.sim.seed}")
    output = open_output(target, command="thermal", force=force)
    out_dir = output.path
    with output.writing() as work:
        result = run_sim(cfg)
        s = result.summary
        write_json_atomic(work / "summary.json", s)
        plot_temperature_frequency(
            {cfg.policy.name: [(p.t_s, p.temp_c, p.limit_mhz) for p in result.samples]},
            work / "temperature_frequency.png",
            title=f"{s['device']}, {s['workload']}, ambient {cfg.ambient_c:g} °C: "
            f"{cfg.policy.name}",
            threshold_c=cfg.threshold_c,
        )
    done = f"{s['completion_s']:.1f} s" if s["finished"] else f"not finished in {s['time_s']:.0f} s"
    console.print(
        f"[bold]{s['device']}[/] {s['workload']} @ {cfg.ambient_c:g} °C, {cfg.policy.name} "
        f"seed {cfg.sim.seed}: completion {done}, {100 * (1 - s['share_below']):.1f}% of the "
        f"time above {cfg.threshold_c:g} °C, peak {s['peak_c']:.1f} °C, "
        f"energy {s['energy_j'] / 1000:.2f} kJ, mean limit {s['mean_limit_mhz']:.0f} MHz"
    )
    console.print(f"wrote {out_dir}/summary.json, temperature_frequency.png")


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="The command to run, after --.")],
    policy: Annotated[str, typer.Option(help="sparta, performance, fixed-cap or reactive.")] = (
        "sparta"
    ),
    threshold: Annotated[float, typer.Option(help="Temperature threshold (°C).")] = 70.0,
    ambient: Annotated[
        float, typer.Option(help="Ambient temperature (°C): Sparta's table key.")
    ] = 25.0,
    app_name: Annotated[
        str | None, typer.Option("--app", help="Application name (default: the program).")
    ] = None,
    profile: Annotated[
        str, typer.Option(help="Device profile Sparta predicts with (name or YAML).")
    ] = "rpi4",
    interval: Annotated[float, typer.Option(help="Control period (s).")] = 1.0,
    root: Annotated[Path, typer.Option(help="Root of the sysfs tree.")] = Path("/"),
    zone: Annotated[
        str | None, typer.Option(help="Thermal zone name or type (default: the hottest).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Policy option: --set sparta.margin_c=1 (repeatable)."),
    ] = None,
    table: Annotated[
        Path | None, typer.Option(help="Sparta's start table JSON (default: user cache).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write summary.json and a PNG here.")] = None,
    force: ForceOption = False,
) -> None:
    """Run COMMAND on this Linux machine under a policy (/sys/class/thermal + cpufreq)."""
    from dlion.core.config import apply_overrides
    from dlion.thermal.config import PolicyConfig
    from dlion.thermal.device import load_profile
    from dlion.thermal.errors import ThermalError
    from dlion.thermal.run import run_command
    from dlion.thermal.table import StartTable, default_table_path
    from dlion.thermal.yamlio import validate

    if interval <= 0:
        raise ThermalError(f"--interval must be > 0 seconds, got {interval}")
    if threshold <= ambient:
        raise ThermalError("--threshold must be above --ambient")
    try:
        raw = apply_overrides({"name": _check_policy(policy)}, list(set_ or []))
    except ConfigError as exc:
        raise ThermalError(str(exc)) from None
    policy_cfg = validate(PolicyConfig, raw, "--set")
    opts = policy_cfg.sparta
    table_path = table or (Path(opts.table_path) if opts.table_path else default_table_path())
    # The policy for directories (never over the user's files); no --out: nothing written.
    output = open_output(out, command="thermal-run", force=force) if out is not None else None
    with output.writing() if output is not None else contextlib.nullcontext(None) as work:
        outcome = run_command(
            command,
            policy=policy_cfg,
            threshold_c=threshold,
            ambient_c=ambient,
            app=app_name or Path(command[0]).name,
            profile=load_profile(profile),
            root=root,
            zone=zone,
            interval_s=interval,
            table=StartTable(table_path, opts.ambient_bucket_c) if policy == "sparta" else None,
            out_dir=work,
        )
    s = outcome.summary
    console.print(
        f"{s['app']} under {s['policy']}: exit {s['returncode']} after {s['time_s']:.1f} s, "
        f"{100 * (1 - s['share_below']):.1f}% of readings above {threshold:g} °C, "
        f"peak {s['peak_c']:.1f} °C, {s['limits_written']} limits written (restored after)",
        highlight=False,
    )
    raise typer.Exit(outcome.returncode)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/thermal-bench"),
    device: Annotated[str, typer.Option(help="Shipped profile name or YAML.")] = "rpi4",
    threshold: Annotated[float, typer.Option(help="Temperature threshold (°C).")] = 70.0,
    ambients: Annotated[str, typer.Option(help="Comma-separated ambients (°C).")] = "25,30,35",
    workloads: Annotated[str, typer.Option(help="Comma-separated workloads.")] = (
        "compute,bursty,memory"
    ),
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = (
        "performance,fixed-cap,reactive,sparta,sparta-cold"
    ),
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per cell.")] = 5,
    history_runs: Annotated[
        int, typer.Option(min=0, help="Sparta learning runs per cell before measuring.")
    ] = 1,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override for every run (repeatable).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    force: ForceOption = False,
) -> None:
    """Every ambient x workload x policy x seed; table, summary.json, report.md, PNGs."""
    from dlion.thermal.bench import BenchSpec, rich_table, run_bench, verdict_lines

    spec = BenchSpec(
        device=device,
        threshold_c=threshold,
        ambients=_split(ambients, "--ambients", float),
        workloads=_split(workloads, "--workloads"),
        policies=_split(policies, "--policies"),
        seeds=seeds,
        history_runs=history_runs,
        overrides=tuple(set_ or []),
    )
    output = open_output(out, command="thermal-bench", force=force, reuse=True)
    with output.writing() as work:
        _, rows, plots = run_bench(spec, work, progress=not quiet)
    console.print(rich_table(rows, f"dlion thermal bench: {device}, threshold {threshold:g} °C"))
    for line in verdict_lines(rows):
        console.print(line, highlight=False)
    console.print(f"wrote {out}/summary.json, report.md, sparta_table.json, {len(plots)} PNG(s)")


@app.command()
def profiles() -> None:
    """List the shipped device profiles."""
    from dlion.thermal.device import load_profile, shipped_profiles

    for name in shipped_profiles():
        p = load_profile(name)
        print(f"{name:<12} {p.description} ({p.f_min:g}-{p.f_max:g} MHz, tau {p.tau_s:.0f} s)")
