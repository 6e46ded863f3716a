"""The `dlion` command. Bad input: one line on stderr, exit 2. Runtime failure: exit 1.

Start-up cost matters (`dlion --help` should answer in about a second): this module
imports neither torch nor matplotlib at the top, and the command groups of the other
modules (`dlion fl`, `dlion dist`, ...) are imported only when one of them is run; the
help listing shows their one-line descriptions from `LAZY_GROUPS`.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dlion import __version__
from dlion.cli.options import ForceOption, wide_console
from dlion.core.errors import BadInput, DlionError
from dlion.core.outdir import default_dir, open_output, resume_output

try:  # typer >= 0.29 vendors click; older versions use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - depends on the installed typer
    # Checked against one typer: click is absent with a new one, typer._click with an old.
    from click.exceptions import UsageError  # type: ignore[import-not-found,no-redef,unused-ignore]


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="dlion: decentralized training across heterogeneous micro-clouds.",
)
console = wide_console()
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        print(f"dlion {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """dlion: decentralized training across heterogeneous micro-clouds."""


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="YAML config path or shipped scenario name.")],
    engine: Annotated[
        str | None,
        typer.Option(help="Engine: sim (virtual clock) or dist (real processes); default: config."),
    ] = None,
    strategy: Annotated[str | None, typer.Option(help="Strategy name (overrides config).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field: --set train.seed=1 (repeatable)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this directory from its latest checkpoint (same config; "
            "train.max_time may grow). FL configs resume their server."
        ),
    ] = None,
    checkpoint_every: Annotated[
        float | None,
        typer.Option(help="Checkpoint every this many seconds (sets checkpoint.every_s)."),
    ] = None,
    stop_at: Annotated[
        float | None,
        typer.Option(help="sim: halt at this virtual time after a checkpoint (resume later)."),
    ] = None,
    netns: Annotated[
        str | None,
        typer.Option(
            help="dist: run each worker in the namespaces of `dlion netns up` (this prefix); "
            "use with engine.shaping=kernel."
        ),
    ] = None,
    force: ForceOption = False,
) -> None:
    """Run one training job; writes metrics.jsonl and summary.json. A config with
    `kind: fl` runs a federated job (server + clients) instead."""
    if engine == "dist" and not quiet:  # torch takes seconds to load: say so at once
        console.print(f"{config}: dist engine, loading torch", highlight=False)
    if engine == "dist" and netns is None:
        from dlion.engines import forkserver

        forkserver.warm_up()  # dist workers' imports start now, beside this process's own
    from dlion.core.config import load_config
    from dlion.engines.sim import run_sim
    from dlion.fl.config import is_fl_source
    from dlion.report.finish import finish_run, summary_lines
    from dlion.report.metrics import warn_diverged

    if is_fl_source(config):
        from dlion.fl.cli import train_fl

        if netns is not None:
            raise BadInput("--netns: only for the dist engine, not for FL configs (kind: fl)")
        if stop_at is not None or checkpoint_every is not None:
            raise BadInput("--stop-at, --checkpoint-every: not for FL configs (kind: fl)")
        train_fl(config, engine, strategy, list(set_ or []), out, quiet, resume, console, force)
        return
    if engine not in (None, "sim", "dist"):
        raise BadInput(f"--engine: unknown engine {engine!r} (available: sim, dist)")
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        raise BadInput(f"--out {out}: a resumed run continues in its own directory ({resume})")
    if checkpoint_every is not None and not (
        math.isfinite(checkpoint_every) and checkpoint_every > 0
    ):
        raise BadInput(f"--checkpoint-every: must be a finite number > 0, got {checkpoint_every:g}")
    if stop_at is not None and not (math.isfinite(stop_at) and stop_at > 0):
        raise BadInput(f"--stop-at: must be a finite number > 0, got {stop_at:g}")
    overrides = list(set_ or [])
    if checkpoint_every is not None:
        overrides = [f"checkpoint.every_s={checkpoint_every!r}", *overrides]
    if engine is not None:
        overrides = [f"engine.name={engine}", *overrides]
    if strategy is not None and strategy != load_config(config).strategy.name:
        # The file's strategy options belong to the file's strategy: start from defaults.
        overrides = [f"strategy.name={strategy}", "strategy.options={}", *overrides]
    # The whole config, strategy options included, is checked before anything is written or
    # any process starts (the data, model and user code next, in run_dist / run_sim).
    cfg = load_config(config, overrides)
    if netns is not None and cfg.engine.name != "dist":
        raise BadInput("--netns: only for the dist engine (--engine dist)")
    if cfg.engine.name == "dist" and stop_at is not None:
        raise BadInput("--stop-at: sim only (stop a dist run with a signal)")
    if resume is not None:
        output = resume_output(resume, command="train")
    else:
        target = out or default_dir(cfg.name, cfg.strategy.name, f"seed{cfg.train.seed}")
        output = open_output(target, command="train", force=force)
    out_dir = output.path
    with output.writing() as work:
        if cfg.engine.name == "dist":
            from dlion.engines.launcher import run_dist

            result = run_dist(
                cfg, out_dir=work, progress=not quiet, resume=resume is not None, netns=netns
            )
        else:
            result = run_sim(
                cfg, out_dir=work, progress=not quiet, resume=resume is not None, stop_at=stop_at
            )
        s = result.summary
        written: list[str] = []
        if "stopped_at" in s:
            output.partial_reason = f"stopped at t={s['stopped_at']:g} s (--stop-at)"
        else:
            written = finish_run(s, result.points, work, name=cfg.name, target=cfg.train.target_acc)
    if "stopped_at" in s:
        console.print(
            f"stopped at t={s['stopped_at']:g} s after a checkpoint in {out_dir}/checkpoints; "
            f"continue with: dlion train {config} --resume {out_dir}"
        )
        return
    warn_diverged([s])
    for line in summary_lines(s, out_dir, written):
        console.print(line)


@app.command("eval")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (with model.safetensors).")],
) -> None:
    """Re-evaluate a run's saved model on its test set (the run's config.yaml says which)
    and compare with the value in its summary.json."""
    import json

    from dlion.core.config import load_config
    from dlion.report.finish import metric_text
    from dlion.training.experiment import evaluate_saved_model

    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: no such run directory")
    if not (run_dir / "config.yaml").is_file():
        raise BadInput(f"{run_dir}: no config.yaml (not a dlion run directory)")
    cfg = load_config(str(run_dir / "config.yaml"))
    metric, loss = evaluate_saved_model(cfg, run_dir)
    shown = metric_text(cfg.evaluation.metric)
    line = f"{run_dir}: {cfg.evaluation.metric} {shown(metric)}, loss {loss:.4f}"
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        try:
            recorded = json.loads(summary_file.read_text()).get("saved_model") or {}
        except ValueError:
            recorded = {}
        if "metric" in recorded:
            same = "matches" if recorded["metric"] == metric else "differs from"
            line += f" ({same} summary.json: {shown(recorded['metric'])}, {recorded['replica']})"
    console.print(line, highlight=False)


@app.command()
def bench(
    suite: Annotated[str, typer.Argument(help="Shipped suite name or YAML path.")],
    strategies: Annotated[
        str | None, typer.Option(help="Comma-separated labels to run (e.g. allreduce,dlion).")
    ] = None,
    scenarios: Annotated[str | None, typer.Option(help="Comma-separated scenarios.")] = None,
    seeds: Annotated[
        int | None, typer.Option(min=1, help="Seeds per run (overrides suite).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override for every run (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Rerun finished runs in --out whose config differs, or replace another "
            "command's output there (never other files)."
        ),
    ] = False,
) -> None:
    """Run a benchmark suite side by side; writes summary.json, report.md and plots.
    Finished runs in --out are reused when their whole resolved config matches."""
    from dlion.cli.suites import load_suite, report, run_suite
    from dlion.fl.bench import is_fl_suite
    from dlion.report.metrics import warn_diverged

    if is_fl_suite(suite):
        from dlion.fl.cli import bench_fl

        bench_fl(
            suite,
            _split(strategies),
            _split(scenarios),
            seeds,
            list(set_ or []),
            out,
            quiet,
            console,
            force,
        )
        return
    spec = load_suite(suite)
    output = open_output(
        out or default_dir("bench", spec.name), command="bench", force=force, reuse=True
    )
    with output.writing() as work:
        runs, plots, lr_search = run_suite(
            spec,
            work,
            strategies=_split(strategies),
            scenarios=_split(scenarios),
            seeds=seeds,
            extra_set=list(set_ or []),
            progress=not quiet,
            force=force,
        )
        table, _ = report(spec, runs, plots, work, lr_search)
    warn_diverged(runs)
    console.print(table)
    console.print(f"wrote {output.path}/summary.json, report.md and {len(plots)} plot(s)")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (dlion train --out).")],
    out: Annotated[Path, typer.Option(help="The plot to write (PNG).")] = Path("compare.png"),
) -> None:
    """Plot several runs' accuracy against time (mean over replicas, the worst replica as a
    band) and print their summaries side by side."""
    from dlion.report.compare import load_run, plot_runs, short_labels, summary_table

    if out.suffix.lower() != ".png":
        raise BadInput(f"--out {out}: the plot is a PNG file (name it *.png)")
    if out.exists() and not out.is_file():
        raise BadInput(f"--out {out}: exists and is not a file")
    runs = [load_run(d) for d in run_dirs]
    runs = [
        type(r)(label, r.summary, r.t, r.mean, r.worst)
        for r, label in zip(runs, short_labels(run_dirs), strict=True)
    ]
    targets = {r.summary.get("target_acc") for r in runs}
    target = targets.pop() if len(targets) == 1 else None
    plot_runs(runs, out, target=target)
    console.print(summary_table(runs))
    console.print(f"wrote {out}")


# The built-in strategies' names and summaries, so that `dlion strategies` answers without
# importing torch; tests/test_cli.py checks this equals the registry.
BUILTIN_STRATEGIES = (
    ("allreduce", "sync SGD: equal batches, dense ring all-reduce every iteration"),
    (
        "dlion",
        "DLion: site all-reduce, one top-k update per site pair, paced by measured speeds; WDB",
    ),
    (
        "dlion-hpdc21",
        "DLion as in HPDC '21: WDB, per-link prioritized all-to-all exchange, knowledge transfer",
    ),
    ("gaia", "Gaia: BSP inside a site, only significant updates (|update|/|w| > 1%) across sites"),
    ("ako", "Ako: asynchronous, one round-robin gradient partition per peer per iteration"),
    ("hop", "Hop: decentralized neighbour averaging, bounded staleness, backup workers, skipping"),
    ("ps-bsp", "parameter server, bulk-synchronous: sum of all gradients per round, then pull"),
    ("ps-asp", "parameter server, asynchronous: apply each gradient on arrival, no waiting"),
    ("adpsgd", "AD-PSGD: asynchronous SGD, atomic pairwise averaging with a random neighbour"),
    ("diloco", "DiLoCo: H inner steps, averaged pseudo-gradient applied by outer Nesterov SGD"),
    (
        "streaming-diloco",
        "Streaming DiLoCo: one strided fragment synced every H/P steps, overlapped, merged",
    ),
    (
        "halos",
        "HALoS: site parameter servers apply local-SGD updates at once, merge with a global one",
    ),
    (
        "sparseloco",
        "SparseLoCo: H inner steps, error-feedback chunked top-k with 2-bit values, mean applied",
    ),
)


@app.command("strategies")
def list_strategies() -> None:
    """List the registered strategies."""
    if not os.environ.get("DLION_PLUGINS"):
        for name, summary in BUILTIN_STRATEGIES:
            print(f"{name:<12} {summary}")
        return
    from dlion.core.registry import BUILTIN, REGISTRY, load_builtins, load_plugins

    load_builtins()
    load_plugins()
    for spec in REGISTRY.values():
        origin = "" if spec.name in BUILTIN else " (plugin)"
        print(f"{spec.name:<12} {spec.summary}{origin}")


@app.command("scenarios")
def list_scenarios() -> None:
    """List the shipped scenario presets."""
    from dlion.core.config import config_from_dict, read_config_source, shipped_scenarios

    names = shipped_scenarios()
    width = max(len(n) for n in names) + 2
    for name in names:  # (not load_config: checking strategy options would load torch)
        print(f"{name:<{width}}{config_from_dict(*read_config_source(name)).description}")


@dataclass(frozen=True)
class LazyGroup:
    """A command group (or command) of another module, imported only when it is run."""

    name: str
    module: str
    attr: str
    help: str  # the group's one-line description, shown by `dlion --help`
    group: bool = True  # False: a single command (a function), not a typer app


# Same descriptions as each module's own typer app (tests/test_cli.py checks they match).
LAZY_GROUPS = (
    LazyGroup(
        "plan",
        "dlion.transient.cli",
        "plan",
        "Choose instance type, count and tier for a deadline or a budget (Monte Carlo).",
        group=False,
    ),
    LazyGroup(
        "probe",
        "dlion.probe.cli",
        "probe",
        "Measure this host's step time and the links between workers; write a cluster YAML.",
        group=False,
    ),
    LazyGroup(
        "dist", "dlion.distbench.cli", "app", "Benchmarks of the dist engine (real processes)."
    ),
    LazyGroup(
        "fl",
        "dlion.fl.cli",
        "app",
        "Federated learning (FedASMU, AAAI '24, and baselines): list algorithms and configs; "
        "serve and join jobs across hosts.",
    ),
    LazyGroup(
        "hybrid",
        "dlion.hybrid.cli",
        "app",
        "Hybrid edge/cloud inference with a selective-query router (ICLR '23).",
    ),
    LazyGroup(
        "netns",
        "dlion.engines.netns_cli",
        "app",
        "Kernel-shaped links for `--engine dist`: a namespace per worker, tc htb per link.",
    ),
    LazyGroup(
        "thermal",
        "dlion.thermal.cli",
        "app",
        "Heat-budget-aware DVFS (Sparta, EDGE '21): keep edge devices cool and fast.",
    ),
    LazyGroup(
        "transfer",
        "dlion.transfer.cli",
        "app",
        "Cross-modality transfer (RecycleML): reuse a trained sensor model for a new modality.",
    ),
    LazyGroup(
        "transient",
        "dlion.transient.cli",
        "app",
        "Training on transient (preemptible) servers: catalog, performance model, benchmarks.",
    ),
)


def load_group(lazy: LazyGroup) -> Any:
    """The real click command of a lazy group (imports its module)."""
    target = getattr(importlib.import_module(lazy.module), lazy.attr)
    if not lazy.group:  # a typer app with one command is that command
        holder = typer.Typer(add_completion=False)
        holder.command(lazy.name)(target)
        target = holder
    command = typer.main.get_command(target)
    command.name = lazy.name
    return command


def build_command(args: list[str]) -> Any:
    """The root click command for these arguments: the group that `args` runs is imported
    for real; the others are light stand-ins that only describe themselves in the help."""
    from typer.core import TyperGroup

    root = typer.main.get_command(app)
    chosen = next((a for a in args if not a.startswith("-")), None)
    for lazy in LAZY_GROUPS:
        if lazy.name == chosen:
            command = load_group(lazy)
        else:
            command = TyperGroup(name=lazy.name, help=lazy.help)
        root.add_command(command, lazy.name)  # type: ignore[attr-defined]
    return root


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, so that it unwinds like Ctrl-C: output
    directories are finished as partial, dist workers are told to leave."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated("SIGTERM")


def _quiet_after_interrupt() -> None:
    """An interrupt unwinds through event loops and torch: their after-the-fact complaints
    (asyncio's 'Task was destroyed but it is pending!', 'Exception ignored in: <coroutine>')
    are noise under the one line that says what happened."""
    logging.getLogger("asyncio").disabled = True
    sys.unraisablehook = lambda _: None
    # Coroutines created but never started when the signal landed ("coroutine ... was
    # never awaited") warn at exit; that is unwinding, not a problem.
    warnings.filterwarnings("ignore", category=RuntimeWarning)


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to one-line messages and exit codes (2 bad input, 1 failure,
    130 SIGINT, 143 SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    # SIGINT explicitly too: a process started in the background by a non-interactive
    # shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt at all,
    # so `kill -INT` would not stop a run (seen in CI).
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_app(argv: list[str] | None) -> object:
    """Run the command line as typer would, minus typer's own handling of Ctrl-C (a silent
    exit 130 that would swallow the note on what an interrupt left behind)."""
    args = sys.argv[1:] if argv is None else list(argv)
    command = build_command(args)
    try:
        with command.make_context("dlion", args) as ctx:
            return command.invoke(ctx)
    except typer.Exit as exc:
        return exc.exit_code


def _main(argv: list[str] | None) -> int:
    try:
        code = _run_app(argv)
    except UsageError as exc:
        if not exc.format_message():
            return 2  # bare `dlion`: help was printed
        hint = f" (see 'dlion {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else ""
        err_console.print(f"error: {exc.format_message()}{hint}", highlight=False, soft_wrap=True)
        return 2
    except typer.Abort:
        err_console.print("aborted", highlight=False)
        return 1
    except BadInput as exc:
        err_console.print(f"error: {exc}", highlight=False, soft_wrap=True)
        return 2
    except DlionError as exc:
        err_console.print(f"failed: {exc}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt as exc:
        _quiet_after_interrupt()
        terminated = isinstance(exc, Terminated)
        notes = "; ".join(getattr(exc, "__notes__", []))
        err_console.print(
            f"interrupted ({'SIGTERM' if terminated else 'SIGINT'})"
            + (f": {notes}" if notes else ""),
            highlight=False,
            soft_wrap=True,
        )
        return 143 if terminated else 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
