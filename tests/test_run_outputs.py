"""What a run leaves and shows (issue 15, items 5-6): progress lines without a terminal,
the start-up status, per-run scalars (CSV, TensorBoard when installed) and `dlion compare`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from dlion.cli.commands import main
from dlion.report import EvalPoint, StartupStatus, TrainProgress
from dlion.report.compare import load_run, short_labels
from dlion.report.scalars import CSV_COLUMNS, tensorboard_available, write_scalars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POINTS = [
    EvalPoint(t=0.0, iteration=0, mean_acc=0.1, min_acc=0.05, mean_loss=2.3, bytes_sent=0),
    EvalPoint(t=0.5, iteration=7, mean_acc=0.6, min_acc=0.5, mean_loss=1.1, bytes_sent=1000),
    EvalPoint(t=1.0, iteration=15, mean_acc=0.9, min_acc=0.85, mean_loss=0.4, bytes_sent=2500),
]


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_progress_without_a_terminal_is_a_line_per_interval_and_one_at_the_end() -> None:
    console, buffer = plain_console()
    with TrainProgress("job [dist]", 10.0, console=console, line_every_s=0.0) as bar:
        bar.update(1.0, 5, 0.5)
        bar.update(2.0, 9, None)  # between evaluations: the last accuracy is kept
    assert buffer.getvalue().splitlines() == [
        "job [dist]: t 1.0/10 s, it 5, acc 0.5000, best 0.5000",
        "job [dist]: t 2.0/10 s, it 9, acc 0.5000, best 0.5000",
        "job [dist]: t 2.0/10 s, it 9, acc 0.5000, best 0.5000",  # the final state
    ]


def test_progress_lines_are_rate_limited() -> None:
    console, buffer = plain_console()
    with TrainProgress("job", 10.0, console=console, line_every_s=3600.0) as bar:
        for k in range(50):
            bar.update(k / 10, k, 0.01 * k)
    assert buffer.getvalue().splitlines() == ["job: t 4.9/10 s, it 49, acc 0.4900, best 0.4900"]


def test_startup_status_without_a_terminal() -> None:
    console, buffer = plain_console()
    with StartupStatus(console=console, every_s=3600.0) as status:
        status.update("starting 3 workers: 3 loading")  # the first state is shown at once
        status.update("starting 3 workers: 1 loading")  # within every_s: not repeated
        status.note("worker 2 exited during start-up (killed by SIGKILL); starting without it")
        status.note("2 workers ready (1.0 s)")
    assert buffer.getvalue().splitlines() == [
        "starting 3 workers: 3 loading",
        "worker 2 exited during start-up (killed by SIGKILL); starting without it",
        "2 workers ready (1.0 s)",
    ]
    quiet, quiet_buffer = plain_console()
    with StartupStatus(enabled=False, console=quiet) as status:
        status.update("x")
        status.note("y")
    assert quiet_buffer.getvalue() == ""


def test_scalars_csv_has_one_row_per_evaluation(tmp_path: Path) -> None:
    written = write_scalars(POINTS, tmp_path)
    assert written[0] == "scalars.csv"
    rows = list(csv.reader((tmp_path / "scalars.csv").open()))
    assert rows[0] == list(CSV_COLUMNS)
    assert rows[1:] == [
        ["0.0", "0", "0.1", "0.05", "2.3", "0"],
        ["0.5", "7", "0.6", "0.5", "1.1", "1000"],
        ["1.0", "15", "0.9", "0.85", "0.4", "2500"],
    ]


def test_tensorboard_events_hold_the_same_series(tmp_path: Path) -> None:
    if not tensorboard_available():
        pytest.skip("tensorboard is not installed (pip install dlion[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert write_scalars(POINTS, tmp_path) == ["scalars.csv", "tensorboard/"]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    worst = events.Scalars("metric/worst")
    assert [e.step for e in worst] == [0, 7, 15]
    assert [round(e.value, 6) for e in worst] == [0.05, 0.5, 0.85]
    assert [e.wall_time for e in worst] == [0.0, 0.5, 1.0]


def fake_run(path: Path, strategy: str, accs: list[tuple[float, float]], tta: float | None) -> Path:
    path.mkdir(parents=True)
    lines = [{"event": "start"}] + [
        {
            "event": "eval",
            "t": 0.5 * k,
            "iteration": k,
            "mean_acc": m,
            "min_acc": w,
            "mean_loss": 1.0,
            "bytes_sent": 0,
        }
        for k, (m, w) in enumerate(accs)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {
        "scenario": "s",
        "strategy": strategy,
        "seed": 0,
        "engine": "sim",
        "target_acc": 0.8,
        "tta_s": tta,
        "final_acc": accs[-1][0],
        "final_min_acc": accs[-1][1],
        "time_s": 0.5 * (len(accs) - 1),
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_compare_plots_runs_and_prints_summaries_side_by_side(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = fake_run(tmp_path / "a", "dlion", [(0.1, 0.1), (0.85, 0.8)], 0.5)
    b = fake_run(tmp_path / "b", "allreduce", [(0.1, 0.1), (0.5, 0.4), (0.7, 0.6)], None)
    out = tmp_path / "cmp.png"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    text = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "dlion" in rows["strategy"] and "allreduce" in rows["strategy"]
    assert "0.50" in rows["tta_s"] and "never" in rows["tta_s"]
    assert "0.8500" in rows["final_acc"] and "0.7000" in rows["final_acc"]
    curve = load_run(b)
    assert curve.t == [0.0, 0.5, 1.0] and curve.worst == [0.1, 0.4, 0.6]


def test_compare_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'empty'}: no summary.json (not a finished dlion run)"
    )
    a = fake_run(tmp_path / "a", "dlion", [(0.1, 0.1)], None)
    assert main(["compare", str(a), "--out", str(tmp_path / "x.txt")]) == 2
    assert "name it *.png" in capsys.readouterr().err


def test_short_labels_disambiguate_same_names() -> None:
    assert short_labels([Path("x/run"), Path("y/run"), Path("z")]) == ["x/run", "y/run", "z"]
