"""`dlion dist ...`: benchmarks of the dist engine (parity with the sim, DDP overhead, faults)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dlion.core.errors import BadInput
from dlion.core.outdir import OutputDir, open_output

app = typer.Typer(no_args_is_help=True, help="Benchmarks of the dist engine (real processes).")
console = Console()

OUT = Path("benchmarks/results/dist")
ForceOption = Annotated[
    bool, typer.Option(help="Replace this benchmark's earlier result in --out.")
]


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str, option: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: seeds, each an integer >= 0."""
    items = _list(text)
    if not items or not all(i.isdigit() for i in items):
        raise BadInput(f"{option}: expected integers >= 0 like 0,1,2, got {text!r}")
    return [int(i) for i in items]


def _positive(value: float, option: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise BadInput(f"{option}: must be a finite number > 0, got {value:g}")
    return value


def _output(out: Path, name: str, force: bool) -> OutputDir:
    """The dist benchmarks share one results directory; each owns its NAME.json/.md."""
    output = open_output(out, command="dist", force=force, reuse=True)
    if not force and (out / f"{name}.json").exists():
        raise BadInput(
            f"--out {out}: holds an earlier {name} result ({name}.json); pass --force to "
            "replace it, or choose another directory"
        )
    return output


@app.command()
def parity(
    scenario: Annotated[str, typer.Option(help="Scenario name or YAML.")] = "microcloud-hetero",
    strategies: Annotated[str, typer.Option(help="Comma-separated.")] = "dlion,allreduce",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    time_scale: Annotated[float, typer.Option(help="Wall seconds per scenario second.")] = 4.0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = OUT,
    force: ForceOption = False,
) -> None:
    """Sim vs dist TTA on one scenario, side by side (dist in scenario seconds)."""
    from dlion.core.config import load_config
    from dlion.distbench.runs import parity as run

    seed_list = _ints(seeds, "--seeds")
    _positive(time_scale, "--time-scale")
    names = _list(strategies)
    for name in names:  # every config is valid before the first run
        load_config(scenario, [f"strategy.name={name}", *(set_ or [])])
    output = _output(out, "parity", force)
    with output.writing() as work:
        run(scenario, names, seed_list, time_scale, work, set_ or [])
    console.print((output.path / "parity.md").read_text())


@app.command()
def ddp(
    wall_s: Annotated[float, typer.Option(help="Seconds of training per measurement.")] = 10.0,
    out: Annotated[Path, typer.Option(help="Output directory.")] = OUT,
    force: ForceOption = False,
) -> None:
    """dlion's allreduce vs DistributedDataParallel: 2 local workers, time per iteration."""
    from dlion.distbench.runs import ddp_overhead

    _positive(wall_s, "--wall-s")
    output = _output(out, "ddp", force)

    models = {
        "mlp 128-64 (digits)": [],
        "mlp 1024-1024 (digits)": ["model.hidden=[1024, 1024]"],
    }
    with output.writing() as work:
        ddp_overhead("homogeneous", models, wall_s, work)
    console.print((output.path / "ddp.md").read_text())


@app.command()
def fault(
    scenario: Annotated[str, typer.Option(help="Scenario name or YAML.")] = "microcloud-hetero",
    strategy: Annotated[str, typer.Option(help="Strategy.")] = "dlion",
    time_scale: Annotated[float, typer.Option(help="Wall seconds per scenario second.")] = 4.0,
    rank: Annotated[int, typer.Option(help="Worker to kill.")] = 2,
    at: Annotated[float, typer.Option(help="Kill at this fraction of the fault-free TTA.")] = 0.3,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = OUT,
    force: ForceOption = False,
) -> None:
    """A fault-free run, then the same run with one worker SIGKILLed part-way."""
    from dlion.distbench.runs import check_fault, fault_run

    _positive(time_scale, "--time-scale")
    check_fault(scenario, strategy, time_scale, rank, at, set_ or [])
    output = _output(out, "fault", force)
    with output.writing() as work:
        fault_run(scenario, strategy, time_scale, rank, at, work, set_ or [])
    console.print((output.path / "fault.md").read_text())


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
    force: ForceOption = False,
) -> None:
    """TTA with kernel-shaped links (netns + tc htb; root) vs transport-shaped links."""
    from dlion.core.config import load_config
    from dlion.distbench.runs import kernel_vs_transport

    seed_list = _ints(seeds, "--seeds")
    _positive(time_scale, "--time-scale")
    load_config(scenario, [f"strategy.name={strategy}", *(set_ or [])])
    output = _output(out, "kernel", force)
    with output.writing() as work:
        kernel_vs_transport(
            scenario, strategy, seed_list, repeats, time_scale, work, set_ or [], prefix
        )
    console.print((output.path / "kernel.md").read_text())
