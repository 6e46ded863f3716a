"""`dlion hybrid ...`: selective-query edge/cloud inference (Kag et al., ICLR '23): train,
eval, route and bench. Bad input raises BadInput, which `dlion.cli.commands.main` turns
into one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dlion.cli.options import ForceOption, wide_console
from dlion.core.errors import BadInput
from dlion.core.outdir import check_output_file, default_dir, open_output

app = typer.Typer(
    help="Hybrid edge/cloud inference with a selective-query router (ICLR '23).",
    no_args_is_help=True,
)
console = wide_console(200)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config field: --set train.rounds=2 (repeatable)."),
]
QuietOption = Annotated[bool, typer.Option(help="No progress bar.")]


def parse_coverages(text: str) -> list[float]:
    """'0.6,0.7' -> [0.6, 0.7]; each must be in (0, 1]."""
    from dlion.hybrid.calibrate import check_coverage

    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise BadInput(f"--coverage: expected numbers like 0.6,0.7, got {text!r}")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise BadInput(f"--coverage: {item!r} is not a number") from None
        values.append(check_coverage(value, "--coverage"))
    return values


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="YAML config path, or a preset: digits, mnist1d.")],
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="Run directory to write.")] = None,
    quiet: QuietOption = False,
    force: ForceOption = False,
) -> None:
    """Train the edge model, the cloud model and the router; save the run."""
    from dlion.hybrid.config import load_hybrid_config
    from dlion.hybrid.store import save_run
    from dlion.hybrid.train import train_hybrid

    cfg = load_hybrid_config(config, list(set_ or []))
    output = open_output(
        out or default_dir("hybrid", cfg.name, f"seed{cfg.seed}"), command="hybrid", force=force
    )
    run_dir = output.path
    with output.writing() as work:
        run = train_hybrid(cfg, progress=not quiet, console=console)
        save_run(run, work)
    acc = run.info["val_acc"]
    console.print(
        f"[bold]{cfg.name}[/] seed {cfg.seed}: validation accuracy edge {acc['edge']:.2%}, "
        f"cloud {acc['cloud']:.2%}; latency edge+router {1e3 * run.latency.edge_s:.3f} ms, "
        f"cloud-only {1e3 * run.latency.cloud_only():.2f} ms"
    )
    console.print(
        f"wrote {run_dir}/ (edge, router, cloud .safetensors, calibration.json, "
        f"config.yaml, run.json); next: dlion hybrid eval {run_dir}"
    )


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A directory written by `dlion hybrid train`.")],
    coverage: Annotated[
        str | None, typer.Option(help="Target coverages, e.g. 0.6,0.7,0.8,0.9 (config's if unset).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write eval.json and the PNG.")] = None,
    force: ForceOption = False,
) -> None:
    """Accuracy, share sent to the cloud and expected latency per target coverage, on test
    (written into the run directory, or into a new --out directory)."""
    from dlion.hybrid.evaluate import evaluate
    from dlion.hybrid.inference import METHODS
    from dlion.hybrid.report import EVAL_COLUMNS, eval_rows, plot_evaluation
    from dlion.hybrid.store import load_run
    from dlion.hybrid.train import load_splits
    from dlion.report import write_json_atomic
    from dlion.report.tables import rich_grid

    targets = parse_coverages(coverage) if coverage is not None else None
    if out is not None and out.resolve() != run_dir.resolve():
        output = open_output(out, command="hybrid-eval", force=force)
    run = load_run(run_dir)
    targets = targets or list(run.cfg.coverages)
    x_test, y_test = load_splits(run.cfg).test
    ev = evaluate(run, x_test, y_test, targets)
    title = f"{run.cfg.name} seed {run.cfg.seed}: {ev.n} test inputs"
    rows = eval_rows(ev, targets)
    console.print(rich_grid(title, EVAL_COLUMNS, rows, section_every=len(METHODS) + 1))
    router_loss = next(p for p in ev.no_loss if p.method == "router")
    console.print(
        f"router at no excess loss (within 0.5 points of cloud-only, test sweep): coverage "
        f"{router_loss.coverage:.2f}, latency {1e3 * router_loss.latency_s:.2f} ms, "
        f"{router_loss.latency_reduction:.1%} below cloud-only"
    )
    if out is None or out.resolve() == run_dir.resolve():
        plot = plot_evaluation(ev, run_dir / "accuracy_vs_latency.png", title)
        write_json_atomic(run_dir / "eval.json", ev.to_json())
        console.print(f"wrote {run_dir / 'eval.json'} and {plot}")
        return
    with output.writing() as work:
        plot_evaluation(ev, work / "accuracy_vs_latency.png", title)
        write_json_atomic(work / "eval.json", ev.to_json())
    console.print(f"wrote {out / 'eval.json'} and {out / 'accuracy_vs_latency.png'}")


@app.command()
def route(
    run_dir: Annotated[Path, typer.Argument(help="A directory written by `dlion hybrid train`.")],
    inputs: Annotated[
        Path, typer.Argument(help="npz with 'x' (n, *input shape) and optionally labels 'y'.")
    ],
    coverage: Annotated[
        float | None, typer.Option(help="Target coverage in (0, 1] (router.default_coverage).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write per-input decisions as JSON.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
) -> None:
    """Route new inputs: which stay on the edge, which go to the cloud, and the answers."""
    if out is not None:
        check_output_file(out, force=force)
    from dlion.hybrid.route import read_inputs
    from dlion.hybrid.route import route as route_inputs
    from dlion.hybrid.store import load_run
    from dlion.report import write_json_atomic

    run = load_run(run_dir)
    x, y = read_inputs(inputs, run.input_shape, run.num_classes)
    routed = route_inputs(run, x, run.cfg.router.default_coverage if coverage is None else coverage)
    sent = routed.sent.tolist()
    n = len(x)
    console.print(
        f"{n} inputs: {len(sent)} sent to the cloud ({len(sent) / n:.1%}), {n - len(sent)} "
        f"answered on the edge (target coverage {routed.coverage:.2f}); expected latency "
        f"{1e3 * routed.latency_s:.2f} ms per input (cloud-only "
        f"{1e3 * run.latency.cloud_only():.2f} ms)"
    )
    shown = ", ".join(str(i) for i in sent[:50]) + (" ..." if len(sent) > 50 else "")
    console.print(f"sent to the cloud: {shown or 'none'}", soft_wrap=True)
    if y is not None:
        console.print(f"accuracy: {float((routed.prediction == y).float().mean()):.2%}")
    if out is not None:
        keep = routed.keep.tolist()
        decisions = [
            {
                "index": i,
                "where": "edge" if keep[i] else "cloud",
                "prediction": int(routed.prediction[i]),
            }
            for i in range(n)
        ]
        write_json_atomic(
            out,
            {
                "coverage": routed.coverage,
                "threshold": routed.threshold,
                "latency_s": routed.latency_s,
                "inputs": decisions,
            },
        )
        console.print(f"wrote {out}")


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/hybrid-bench"),
    datasets: Annotated[str, typer.Option(help="Comma-separated presets.")] = "digits,mnist1d",
    seeds: Annotated[int, typer.Option(help="Seeds per dataset.")] = 3,
    coverage: Annotated[str, typer.Option(help="Target coverages.")] = "0.5,0.6,0.7,0.8,0.9",
    set_: SetOption = None,
    quiet: QuietOption = False,
    force: ForceOption = False,
) -> None:
    """Datasets x seeds: router vs thresholding vs oracle; writes JSON, markdown and PNGs."""
    from dlion.hybrid.bench import run_bench, write_outputs
    from dlion.hybrid.config import PRESETS

    names = [d.strip() for d in datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in PRESETS]
    if not names or unknown:
        raise BadInput(
            f"--datasets: unknown {unknown or datasets!r} (presets: {', '.join(sorted(PRESETS))})"
        )
    targets = parse_coverages(coverage)
    overrides = list(set_ or [])
    output = open_output(out, command="hybrid-bench", force=force, reuse=True)
    command = " ".join(
        [
            "dlion hybrid bench",
            f"--out {out}",
            f"--datasets {','.join(names)}",
            f"--seeds {seeds}",
            f"--coverage {coverage}",
            *(f"--set {json.dumps(o)}" for o in overrides),
        ]
    )
    with output.writing() as work:
        results = run_bench(
            work,
            datasets=names,
            seeds=seeds,
            coverages=targets,
            overrides=overrides,
            progress=not quiet,
            console=console,
        )
        tables, plots = write_outputs(results, targets, work, command)
    for table in tables:
        console.print(table)
    reused = sum(r.reused for r in results)
    console.print(
        f"wrote {out}/summary.json, report.md and {len(plots)} plot(s)"
        + (f"; reused {reused} finished run(s)" if reused else "")
    )
