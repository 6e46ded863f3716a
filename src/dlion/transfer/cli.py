"""`dlion transfer`: cross-modality transfer commands (RecycleML, EdgeSys '18)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from dlion.cli.options import ForceOption, wide_console
from dlion.core.errors import BadInput
from dlion.core.outdir import check_output_file, default_dir, open_output

app = typer.Typer(
    help="Cross-modality transfer (RecycleML): reuse a trained sensor model for a new modality.",
    no_args_is_help=True,
)
console = wide_console()

ConfigArg = Annotated[
    str, typer.Argument(help="YAML config file, or 'synthetic' for the generated set.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config field: --set labels.ks=[10,50] (repeatable)."),
]
QuietOpt = Annotated[bool, typer.Option(help="No progress bars.")]


TRAIN_HELP = (
    "Source model, latent regression, zero-/few-label transfer vs scratch; saves weights."
    "\n\n"
    "Data: data.path is an .npz with one array 'modality_<name>' per modality, all with the "
    "same first dimension, shaped (n, features) or (n, channels, length), and integer "
    "'labels' (n,); data.source and data.target name two of its modalities. Without "
    "data.path the synthetic set (modalities imu and audio) is generated."
)


@app.command(help=TRAIN_HELP)
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Run directory.")] = None,
    quiet: QuietOpt = False,
    force: ForceOption = False,
) -> None:
    """Source model, latent regression, zero-/few-label transfer vs scratch; saves weights."""
    from dlion.transfer.config import load_transfer_config
    from dlion.transfer.pipeline import kept_messages, run_transfer
    from dlion.transfer.progress import Stages
    from dlion.transfer.report import (
        aggregate,
        markdown_tables,
        plot_accuracy_vs_labels,
        rich_tables,
    )

    cfg = load_transfer_config(config, list(set_ or []))
    name = f"transfer-{cfg.name}-{cfg.data.source}-to-{cfg.data.target}-seed{cfg.seed}"
    output = open_output(out or default_dir(name), command="transfer", force=force)
    out_dir = output.path
    with output.writing() as work, Stages(enabled=not quiet, console=console) as stages:
        summary = run_transfer(cfg, out_dir=work, stages=stages)
        results = aggregate([summary])
        plot_accuracy_vs_labels(results, work / "accuracy_vs_labels.png", title=cfg.name)
        (work / "results.md").write_text(markdown_tables(results) + "\n", encoding="utf-8")
    for table in rich_tables(results):
        console.print(table)
    for line in kept_messages(summary):
        console.print(line, soft_wrap=True)
    console.print(
        f"wrote {out_dir}/: source_model, target_encoder and few_label_heads .safetensors, "
        "meta.json, summary.json, results.md, accuracy_vs_labels.png"
    )


@app.command()
def bench(
    config: ConfigArg = "synthetic",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds: config seed, +1, ...")] = 3,
    one_way: Annotated[
        bool, typer.Option(help="Only source → target (default: both directions).")
    ] = False,
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/transfer-bench"),
    quiet: QuietOpt = False,
    force: ForceOption = False,
) -> None:
    """Transfer vs scratch over seeds and both directions; bench.json, bench.md and a PNG."""
    from dlion.transfer.bench import BENCH_JSON, BENCH_MD, BENCH_PNG, run_bench
    from dlion.transfer.config import load_transfer_config
    from dlion.transfer.report import rich_tables

    overrides = list(set_ or [])
    cfg = load_transfer_config(config, overrides)
    output = open_output(out, command="transfer-bench", force=force, reuse=True)
    out_dir = output.path
    words = ["dlion", "transfer", "bench", config, "--seeds", str(seeds), "--out", str(out)]
    words += ["--one-way"] if one_way else []
    words += [w for item in overrides for w in ("--set", item)]
    with output.writing() as work:
        results, report = run_bench(
            cfg,
            work,
            seeds=seeds,
            both_directions=not one_way,
            progress=not quiet,
            command=shlex.join(words),
        )
    for table in rich_tables(results):
        console.print(table)
    console.print(
        f"{len(report['runs'])} runs in {report['wall_time_s']:.0f} s; "
        f"wrote {out_dir}/{BENCH_JSON}, {BENCH_MD}, {BENCH_PNG}"
    )


@app.command()
def generate(
    out: Annotated[Path, typer.Argument(help="Output .npz file.")],
    config: Annotated[
        str, typer.Option(help="Config whose data.synthetic section and seed are used.")
    ] = "synthetic",
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an existing OUT file.")] = False,
) -> None:
    """Write the synthetic multimodal set in the documented npz format."""
    from dlion.transfer.config import load_transfer_config
    from dlion.transfer.data import generate_synthetic, write_multimodal_npz

    if out.suffix != ".npz":
        raise BadInput(f"{out}: the output file must end in .npz")
    check_output_file(out, force=force, option="OUT")
    cfg = load_transfer_config(config, list(set_ or []))
    data = generate_synthetic(cfg.data.synthetic, cfg.seed)
    # Written beside and renamed over: an interrupted write never leaves half a file.
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    write_multimodal_npz(tmp, data)
    tmp.replace(out)
    shapes = ", ".join(f"modality_{k} {tuple(v.shape)}" for k, v in data.modalities.items())
    console.print(f"wrote {out}: {shapes}, labels ({len(data)},), seed {cfg.seed}")
