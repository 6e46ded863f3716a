"""`dlion dist ...`: benchmarks of the dist engine (parity with the sim, DDP overhead, faults)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="Benchmarks of the dist engine (real processes).")
console = Console()

OUT = Path("benchmarks/results/dist")


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command()
def parity(
    scenario: Annotated[str, typer.Option(help="Scenario name or YAML.")] = "microcloud-hetero",
    strategies: Annotated[str, typer.Option(help="Comma-separated.")] = "dlion,allreduce",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    time_scale: Annotated[float, typer.Option(help="Wall seconds per scenario second.")] = 4.0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = OUT,
) -> None:
    """Sim vs dist TTA on one scenario, side by side (dist in scenario seconds)."""
    from dlion.distbench import parity as run

    run(scenario, _list(strategies), [int(s) for s in _list(seeds)], time_scale, out, set_ or [])
    console.print((out / "parity.md").read_text())


@app.command()
def ddp(
    wall_s: Annotated[float, typer.Option(help="Seconds of training per measurement.")] = 10.0,
    out: Annotated[Path, typer.Option(help="Output directory.")] = OUT,
) -> None:
    """dlion's allreduce vs DistributedDataParallel: 2 local workers, time per iteration."""
    from dlion.distbench import ddp_overhead

    models = {
        "mlp 128-64 (digits)": [],
        "mlp 1024-1024 (digits)": ["model.hidden=[1024, 1024]"],
    }
    ddp_overhead("homogeneous", models, wall_s, out)
    console.print((out / "ddp.md").read_text())


@app.command()
def fault(
    scenario: Annotated[str, typer.Option(help="Scenario name or YAML.")] = "microcloud-hetero",
    strategy: Annotated[str, typer.Option(help="Strategy.")] = "dlion",
    time_scale: Annotated[float, typer.Option(help="Wall seconds per scenario second.")] = 4.0,
    rank: Annotated[int, typer.Option(help="Worker to kill.")] = 2,
    at: Annotated[float, typer.Option(help="Kill at this fraction of the fault-free TTA.")] = 0.3,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = OUT,
) -> None:
    """A fault-free run, then the same run with one worker SIGKILLed part-way."""
    from dlion.distbench import fault_run

    fault_run(scenario, strategy, time_scale, rank, at, out, set_ or [])
    console.print((out / "fault.md").read_text())


@app.command()
def kernel(
    scenario: Annotated[str, typer.Option(help="Scenario name or YAML.")] = "microcloud-hetero",
    strategy: Annotated[str, typer.Option(help="Strategy.")] = "dlion",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    repeats: Annotated[int, typer.Option(min=1, help="Runs per seed and shaping.")] = 3,
    time_scale: Annotated[float, typer.Option(help="Wall seconds per scenario second.")] = 4.0,
    prefix: Annotated[str, typer.Option(help="Namespace prefix used (and removed) here.")] = (
        "dlbench"
    ),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = OUT,
) -> None:
    """TTA with kernel-shaped links (netns + tc htb; root) vs transport-shaped links."""
    from dlion.distbench import kernel_vs_transport

    kernel_vs_transport(
        scenario,
        strategy,
        [int(s) for s in _list(seeds)],
        repeats,
        time_scale,
        out,
        set_ or [],
        prefix,
    )
    console.print((out / "kernel.md").read_text())
