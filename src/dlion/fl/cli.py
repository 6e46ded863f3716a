"""`dlion fl ...` (list algorithms and FL configs) and the FL paths of `dlion train` and
`dlion bench`, which dispatch here when the config or suite has `kind: fl`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dlion.core.errors import BadInput

app = typer.Typer(
    help="Federated learning (FedASMU, AAAI '24, and baselines): list algorithms and configs; "
    "serve and join jobs across hosts.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("algorithms")
def algorithms() -> None:
    """List the registered FL algorithms."""
    from dlion.fl import ALGORITHMS

    for spec in ALGORITHMS.values():
        print(f"{spec.name:<18} {spec.summary}")


@app.command("scenarios")
def scenarios() -> None:
    """List the shipped FL configs (use with `dlion train NAME`)."""
    from dlion.fl.config import fl_presets, load_fl_config

    for name in fl_presets():
        print(f"{name:<14} {load_fl_config(name).description}")


@app.command("serve")
def serve_command(
    config: Annotated[str, typer.Argument(help="FL config (YAML path or shipped name).")],
    listen: Annotated[
        str,
        typer.Option(
            help="HOST:PORT the job's store listens on; clients connect there (0.0.0.0: "
            "every interface)."
        ),
    ] = "127.0.0.1:29400",
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/NAME-ALGO-dist).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the latest checkpoint in --out.")
    ] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an earlier output in --out.")] = False,
) -> None:
    """Run the FL server of a dist job: clients on any host join with `dlion fl client`.
    Ctrl-C (or SIGTERM) stops it with a checkpoint; `--resume` continues from it."""
    from dlion.jobs.dist_worker import process_main

    process_main(lambda _: _serve(config, listen, out, resume, set_ or [], force), [])


def _serve(
    config: str, listen: str, out: Path | None, resume: bool, overrides: list[str], force: bool
) -> int:
    from dlion.core.outdir import open_output, resume_output
    from dlion.fl.config import load_fl_config
    from dlion.fl.processes import serve

    cfg = load_fl_config(config, [*overrides, "engine.name=dist"])
    target = out or Path("runs") / f"{cfg.name}-{cfg.algorithm.name}-dist"
    if resume:
        output = resume_output(target, command="fl serve", option="--out")
    else:
        output = open_output(target, command="fl serve", force=force)
    with output.writing() as work:
        return serve(cfg, work, listen=listen, resume=resume)


@app.command("client")
def client_command(
    config: Annotated[str, typer.Argument(help="The server's FL config (same --set too).")],
    server: Annotated[str, typer.Option(help="HOST:PORT where `dlion fl serve` listens.")],
    client_id: Annotated[
        int, typer.Option(help="Which client of the population (1..clients.count).")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Write this client's events to OUT/workers/.")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override.")] = None,
) -> None:
    """Run one FL client of a dist job served by `dlion fl serve` (on this or another host);
    the shared secret comes from DLION_SECRET (or engine.secret)."""
    from dlion.fl.config import load_fl_config
    from dlion.fl.processes import join_as_client
    from dlion.jobs.dist_worker import process_main

    def run(_: list[str]) -> int:
        cfg = load_fl_config(config, [*(set_ or []), "engine.name=dist"])
        return join_as_client(cfg, client_id, out, server)

    process_main(run, [])


def train_fl(
    source: str,
    engine: str | None,
    algorithm: str | None,
    overrides: list[str],
    out: Path | None,
    quiet: bool,
    resume: Path | None,
    console: Console,
    force: bool = False,
) -> None:
    from dlion.core.outdir import default_dir, open_output, resume_output
    from dlion.fl.config import load_fl_config
    from dlion.jobs.fl_sim import run_fl
    from dlion.report import plot_accuracy_vs_time

    if engine not in (None, "sim", "dist"):
        raise BadInput(f"--engine: FL jobs run on: sim, dist (got {engine!r})")
    if engine is not None:
        overrides = [f"engine.name={engine}", *overrides]
    if algorithm is not None and algorithm != load_fl_config(source).algorithm.name:
        # The file's options belong to the file's algorithm: start from defaults.
        overrides = [f"algorithm.name={algorithm}", "algorithm.options={}", *overrides]
    cfg = load_fl_config(source, overrides)
    if resume is not None:
        output = resume_output(resume, command="train")
        if out is not None and out.resolve() != resume.resolve():
            raise BadInput(f"--out {out}: a resumed run continues in its own directory ({resume})")
    else:
        target = out or default_dir(cfg.name, cfg.algorithm.name, f"seed{cfg.train.seed}")
        output = open_output(target, command="train", force=force)
    out_dir = output.path
    with output.writing() as work:
        if cfg.engine.name == "dist":
            from dlion.fl.processes import run_fl_dist

            result = run_fl_dist(cfg, out_dir=work, resume=resume is not None)
        else:
            result = run_fl(cfg, out_dir=work, progress=not quiet, resume=resume)
        s = result.summary
        plot_accuracy_vs_time(
            {s["strategy"]: [(p.t, p.mean_acc) for p in result.points]},
            work / "accuracy_vs_time.png",
            title=f"{cfg.name}: {s['strategy']} (global model)",
            target=cfg.train.target_acc,
        )
    from dlion.report.metrics import warn_diverged

    warn_diverged([s])
    tta = "not reached" if s["tta_s"] is None else f"{s['tta_s']:.1f} s"
    srv = s["server"]
    clock = "wall" if s["engine"] == "dist" else "simulated"
    departures = s["vanished"] + len(s.get("departures", []))
    console.print(
        f"[bold]{s['scenario']}[/] {s['strategy']} seed {s['seed']}: time to "
        f"{s['target_acc']:.1%} = {tta}, final accuracy {s['final_acc']:.2%} at "
        f"{s['time_s']:.1f} {clock} s; {srv['merged']} uploads merged, {srv['stale']} stale, "
        f"{srv['rejected_total']} rejected, {srv['clipped']} clipped, {srv['abandoned']} "
        f"abandoned; {departures} client departures; {s['bytes_sent'] / 1e6:.1f} MB sent"
    )
    console.print(
        f"wrote {out_dir}/summary.json, metrics.jsonl, partition.json, accuracy_vs_time.png"
    )


def bench_fl(
    source: str,
    labels: list[str] | None,
    scenario_names: list[str] | None,
    seeds: int | None,
    overrides: list[str],
    out: Path | None,
    quiet: bool,
    console: Console,
    force: bool = False,
) -> None:
    from dlion.core.outdir import default_dir, open_output
    from dlion.fl.bench import load_fl_suite, run_fl_suite, write_fl_report
    from dlion.report.metrics import warn_diverged

    suite = load_fl_suite(source)
    output = open_output(
        out or default_dir("bench", suite.name), command="bench", force=force, reuse=True
    )
    with output.writing() as work:
        runs, plots = run_fl_suite(
            suite,
            work,
            labels=labels,
            scenarios=scenario_names,
            seeds=seeds,
            extra_set=overrides,
            progress=not quiet,
        )
        text = write_fl_report(suite, runs, plots, work)
    warn_diverged(runs)
    console.print(text, markup=False, highlight=False)
    console.print(f"wrote {output.path}/summary.json, report.md and {len(plots)} plot(s)")
