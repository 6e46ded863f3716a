"""Tests for dlion.report: metrics log, TTA, atomic JSON, aggregation, tables, plots, progress."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from dlion.core.errors import DataError
from dlion.report import (
    AggregateRow,
    EvalPoint,
    MetricsLog,
    TrainProgress,
    aggregate,
    bench_table,
    markdown_table,
    mean_curve,
    plot_accuracy_vs_time,
    read_metrics,
    time_to_accuracy,
    write_json_atomic,
    write_report,
)
from dlion.report.tables import markdown_grid


def _point(t: float, acc: float) -> EvalPoint:
    return EvalPoint(t=t, iteration=int(t), mean_acc=acc, min_acc=acc, mean_loss=1.0, bytes_sent=0)


def _run(
    strategy: str,
    seed: int,
    tta: float | None,
    final_acc: float,
    scenario: str = "s1",
    bytes_sent: int = 1_000_000,
) -> dict[str, object]:
    return {
        "scenario": scenario,
        "strategy": strategy,
        "seed": seed,
        "engine": "sim",
        "target_acc": 0.8,
        "tta_s": tta,
        "final_acc": final_acc,
        "final_loss": 0.5,
        "time_s": 100.0,
        "bytes_sent": bytes_sent,
    }


# --- time_to_accuracy ---------------------------------------------------------------------


def test_tta_first_crossing() -> None:
    points = [_point(0, 0.1), _point(5, 0.6), _point(10, 0.85), _point(15, 0.7), _point(20, 0.9)]
    assert time_to_accuracy(points, 0.8) == 10


def test_tta_exactly_equal_counts() -> None:
    points = [_point(0, 0.1), _point(5, 0.8), _point(10, 0.9)]
    assert time_to_accuracy(points, 0.8) == 5


def test_tta_never_and_empty() -> None:
    assert time_to_accuracy([_point(0, 0.1), _point(5, 0.79)], 0.8) is None
    assert time_to_accuracy([], 0.8) is None


# --- MetricsLog / read_metrics ------------------------------------------------------------


def test_metrics_log_flushes_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(path)
    log.write("eval", t=1.5, mean_acc=0.25, iteration=3)
    # Readable before close: every line is flushed.
    assert read_metrics(path) == [{"event": "eval", "t": 1.5, "mean_acc": 0.25, "iteration": 3}]
    log.write("done", ok=True)
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert read_metrics(path) == log.events
    assert log.events[1] == {"event": "done", "ok": True}


def test_metrics_log_context_manager_and_memory_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write("start")
    assert read_metrics(path) == [{"event": "start"}]

    mem = MetricsLog(None)
    mem.write("eval", t=0.0)
    mem.close()
    assert mem.events == [{"event": "eval", "t": 0.0}]


def test_read_metrics_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "a"}\n{"event": \n')
    with pytest.raises(DataError, match=r"metrics\.jsonl.*line 2"):
        read_metrics(path)


def test_read_metrics_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl"):
        read_metrics(tmp_path / "nope.jsonl")


# --- write_json_atomic --------------------------------------------------------------------


def test_write_json_atomic_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"runs": [1, 2, 3]})
    assert json.loads(path.read_text()) == {"runs": [1, 2, 3]}
    assert "\n  " in path.read_text()  # indented


def test_write_json_atomic_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# --- aggregate / tables -------------------------------------------------------------------


def test_aggregate_means_speedup_and_order() -> None:
    runs = [
        _run("allreduce", 0, 10.0, 0.80, bytes_sent=4_000_000),
        _run("dlion", 0, 4.0, 0.90, bytes_sent=1_000_000),
        _run("allreduce", 1, 12.0, 0.84, bytes_sent=6_000_000),
        _run("dlion", 1, 6.0, 0.92, bytes_sent=3_000_000),
    ]
    rows = aggregate(runs)
    assert [(r.scenario, r.strategy) for r in rows] == [("s1", "allreduce"), ("s1", "dlion")]
    base, dlion = rows
    assert base.seeds == 2 and base.reached == 2
    assert base.tta_mean == pytest.approx(11.0)
    assert base.speedup_vs_baseline == pytest.approx(1.0)
    assert dlion.tta_mean == pytest.approx(5.0)
    assert dlion.speedup_vs_baseline == pytest.approx(2.2)
    assert dlion.final_acc_mean == pytest.approx(0.91)
    # Sample std of (0.90, 0.92) is 0.01 * sqrt(2).
    assert dlion.final_acc_std == pytest.approx(0.01 * math.sqrt(2))
    assert base.bytes_mean == pytest.approx(5_000_000)
    assert dlion.bytes_mean == pytest.approx(2_000_000)


def test_aggregate_partial_and_none_cases() -> None:
    runs = [
        _run("allreduce", 0, None, 0.5, scenario="a"),
        _run("dlion", 0, 4.0, 0.9, scenario="a"),
        _run("dlion", 1, None, 0.7, scenario="a"),
        _run("gossip", 0, 8.0, 0.85, scenario="b"),  # no baseline in scenario b
        _run("allreduce", 0, 10.0, 0.85, scenario="c"),
        _run("dlion", 0, None, 0.6, scenario="c"),
    ]
    rows = {(r.scenario, r.strategy): r for r in aggregate(runs)}
    assert [k[0] for k in rows] == ["a", "a", "b", "c", "c"]
    a_base, a_dlion = rows["a", "allreduce"], rows["a", "dlion"]
    assert a_base.tta_mean is None and a_base.reached == 0 and a_base.speedup_vs_baseline is None
    # Mean over seeds that reached only.
    assert a_dlion.tta_mean == pytest.approx(4.0)
    assert (a_dlion.reached, a_dlion.seeds) == (1, 2)
    assert a_dlion.speedup_vs_baseline is None  # baseline never reached
    assert rows["b", "gossip"].speedup_vs_baseline is None  # baseline absent
    assert rows["b", "gossip"].final_acc_std == 0.0  # single seed
    assert rows["c", "dlion"].speedup_vs_baseline is None  # this strategy never reached


def test_aggregate_custom_baseline_and_bad_record() -> None:
    runs = [_run("allreduce", 0, 10.0, 0.8), _run("dlion", 0, 5.0, 0.9)]
    rows = aggregate(runs, baseline="dlion")
    assert rows[0].speedup_vs_baseline == pytest.approx(0.5)
    bad = dict(runs[0])
    del bad["final_acc"]
    with pytest.raises(DataError, match="final_acc"):
        aggregate([bad])


def _rows() -> list[AggregateRow]:
    return aggregate(
        [
            _run("allreduce", 0, 10.0, 0.80),
            _run("allreduce", 1, 12.0, 0.84),
            _run("dlion", 0, 4.0, 0.90, bytes_sent=2_500_000),
            _run("dlion", 1, 6.0, 0.92, bytes_sent=2_500_000),
            _run("dlion", 0, None, 0.5, scenario="hard"),
        ]
    )


def test_markdown_table_contains_rows() -> None:
    text = markdown_table(_rows())
    lines = text.splitlines()
    assert lines[0].startswith("| scenario | strategy | TTA (s) mean")
    assert len(lines) == 2 + 3
    assert "| s1 | dlion | 5.0 | 2/2 | 2.20x | 91.0 ± 1.4 | 2.50 |" in lines
    assert "| s1 | allreduce | 11.0 | 2/2 | 1.00x |" in text
    assert "| hard | dlion | — | 0/1 | — | 50.0 ± 0.0 | 1.00 |" in lines


def test_markdown_grid_aligns_the_left_columns_and_escapes_pipes() -> None:
    text = markdown_grid(["a", "b", "c"], [["x|y", "1", "2"]], left={0, 2})
    assert text == "| a | b | c |\n|:---|---:|:---|\n| x\\|y | 1 | 2 |"


def test_bench_table_renders() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=160)
    console.print(bench_table(_rows(), title="bench"))
    out = buf.getvalue()
    assert "bench" in out
    assert "2.20x" in out
    assert "2/2" in out and "0/1" in out
    assert "hard" in out


def test_write_report(tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.md"
    write_report(path, _rows(), title="Bench", plots=["s1.png"], notes="Some notes.")
    text = path.read_text()
    assert text.startswith("# Bench\n")
    assert "2.20x" in text
    assert "Some notes." in text
    assert "![s1](s1.png)" in text


# --- plots --------------------------------------------------------------------------------


def test_plot_accuracy_vs_time_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "plots" / "acc.png"
    curves = {
        "dlion": [(0.0, 0.1), (5.0, 0.5), (10.0, 0.9)],
        "allreduce": [(0.0, 0.1), (10.0, 0.6)],
    }
    result = plot_accuracy_vs_time(curves, path, title="acc", target=0.8)
    assert result == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_mean_curve_hand_computed() -> None:
    a = [(0.0, 0.1), (2.0, 0.5), (4.0, 0.9)]
    b = [(0.0, 0.3), (3.0, 0.7)]
    # Grid {0, 2, 3}; t=4 is past b's last time. Values carry forward between points.
    result = mean_curve([a, b])
    assert [t for t, _ in result] == [0.0, 2.0, 3.0]
    assert [v for _, v in result] == pytest.approx([0.2, 0.4, 0.6])


def test_mean_curve_edge_cases() -> None:
    assert mean_curve([]) == []
    assert mean_curve([[(0.0, 0.5)], []]) == []
    single = [(0.0, 0.1), (1.0, 0.2)]
    assert mean_curve([single]) == single
    # A later-starting curve: the grid starts where every curve has a value.
    late = [(1.0, 0.4), (2.0, 0.6)]
    assert mean_curve([[*single, (2.0, 0.3)], late]) == [
        (1.0, pytest.approx(0.3)),
        (2.0, pytest.approx(0.45)),
    ]


# --- progress -----------------------------------------------------------------------------


def test_train_progress_enabled_non_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=160)
    with TrainProgress("dlion seed 0", 10.0, console=console) as progress:
        progress.update(1.0, 10, None)
        progress.update(2.0, 20, 0.4321)
        progress.update(3.0, 30, 0.3)
        progress.update(12.0, 40, None)  # past max_time must not crash
    out = buf.getvalue()
    assert "dlion seed 0" in out
    assert "0.3000" in out  # latest accuracy
    assert "0.4321" in out  # best accuracy
    assert progress.best_acc == pytest.approx(0.4321)


def test_train_progress_disabled_is_silent() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=160)
    with TrainProgress("run", 10.0, enabled=False, console=console) as progress:
        progress.update(1.0, 10, 0.5)
    assert buf.getvalue() == ""
