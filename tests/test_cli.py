"""Tests for the `dlion` command: listings, one-line bad-input errors (exit 2), train, bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlion.cli.commands import main
from dlion.core.config import shipped_scenarios
from dlion.core.registry import BUILTIN
from dlion.strategies import REGISTRY

HETERO = "microcloud-hetero"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {
    "scenario",
    "strategy",
    "seed",
    "engine",
    "target_acc",
    "tta_s",
    "final_acc",
    "final_loss",
    "time_s",
    "bytes_sent",
}


def _assert_one_error_line(out: str, err: str) -> str:
    """stderr is exactly one non-empty `error: ...` line, and nothing shows a traceback."""
    assert "Traceback" not in out
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    line = lines[0]
    assert line.startswith("error: ")
    assert line.removeprefix("error: ").strip()
    return line


# ----------------------------------------------------------------------------- listings


def test_strategies_lists_registry_one_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    names = [line.split()[0] for line in captured.out.splitlines() if line.strip()]
    assert {"allreduce", "dlion"} <= set(names)
    # The built-ins in registry order (another test module may have registered a plugin).
    assert names == [name for name in REGISTRY if name in BUILTIN]


def test_scenarios_lists_presets_one_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenarios"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    names = [line.split()[0] for line in captured.out.splitlines() if line.strip()]
    assert {"homogeneous", HETERO} <= set(names)
    assert names == shipped_scenarios()


# ----------------------------------------------------------------------------- bad input

SUITE_BAD_KEY = "name: s\nscenarios: [microcloud-hetero]\nstrategies: [{label: a, strategy: x}]\n"
SUITE_BAD_KEY += "sedes: 2\n"
SUITE_BAD_SCENARIO = (
    "name: s\nscenarios: [nope-scenario]\nstrategies: [{label: a, strategy: allreduce}]\n"
)
SUITE_BAD_STRATEGY = (
    "name: s\nscenarios: [microcloud-hetero]\nideal: false\n"
    "strategies: [{label: a, strategy: warp-drive}]\n"
)

# (argv, fragments the error line must contain). "{tmp}" stands for tmp_path.
BAD_ARGV: list[tuple[list[str], list[str]]] = [
    (["train", "{tmp}/missing.yaml"], ["{tmp}/missing.yaml"]),
    (["train", "{tmp}/invalid.yaml"], ["{tmp}/invalid.yaml", "line"]),
    (["train", "{tmp}/list.yaml"], ["{tmp}/list.yaml"]),
    (["train", "{tmp}"], ["{tmp}"]),
    (["train", "no-such-scenario"], ["no-such-scenario"]),
    (["train", HETERO, "--set", "train.bogus=1"], ["train.bogus"]),
    (["train", HETERO, "--set", "bogus=1"], ["bogus"]),
    (["train", HETERO, "--set", "train.seed=abc"], ["train.seed"]),
    (["train", HETERO, "--set", "train.lr=-1"], ["train.lr"]),
    (["train", HETERO, "--set", "train.target_acc=1.5"], ["train.target_acc"]),
    (["train", HETERO, "--set", "data.name=imagenet"], ["data.name", "imagenet"]),
    (["train", HETERO, "--set", "train.seed"], ["train.seed", "KEY=VALUE"]),
    (["train", HETERO, "--set", "train.lr.x=1"], ["train.lr"]),
    (["train", HETERO, "--set", "cluster.workers.7.site=x"], ["cluster.workers.7"]),
    (["train", HETERO, "--quiet", "--strategy", "foo"], ["strategy.name", "foo"]),
    (["train", HETERO, "--quiet", "--set", "strategy.name=foo"], ["strategy.name", "foo"]),
    (
        ["train", HETERO, "--quiet", "--set", "strategy.options.nope=1"],
        ["strategy.options.nope"],
    ),
    (
        ["train", HETERO, "--quiet", "--set", "strategy.options.rho=abc"],
        ["strategy.options.rho"],
    ),
    (
        ["train", HETERO, "--quiet", "--set", "strategy.options.dkt_gamma=2"],
        ["strategy.options.dkt_gamma"],
    ),
    (
        ["train", HETERO, "--quiet", "--strategy", "allreduce", "--set", "strategy.options.rho=1"],
        ["strategy.options.rho", "allreduce"],
    ),
    (
        [
            "train",
            HETERO,
            "--quiet",
            "--set",
            "cluster.links.0.sites=null",
            "--set",
            "cluster.links.0.workers=[0, 9]",
        ],
        ["cluster.links.0.workers"],
    ),
    (["train", HETERO, "--quiet", "--set", "data.name=npz"], ["npz"]),
    (["train", HETERO, "--engine", "warp"], ["--engine", "warp"]),
    (["train", HETERO, "--bogus"], ["--bogus"]),
    (["train"], ["config"]),
    (["nosuchcmd"], ["nosuchcmd"]),
    (["bench", "no-such-suite"], ["no-such-suite"]),
    (["bench", "{tmp}/missing-suite.yaml"], ["{tmp}/missing-suite.yaml"]),
    (["bench", "{tmp}/invalid.yaml"], ["{tmp}/invalid.yaml"]),
    (["bench", "{tmp}/suite-bad-key.yaml"], ["{tmp}/suite-bad-key.yaml", "sedes"]),
    (["bench", "{tmp}/suite-bad-scenario.yaml"], ["nope-scenario"]),
    (
        ["bench", "{tmp}/suite-bad-strategy.yaml", "--quiet", "--out", "{tmp}/o"],
        ["strategy.name", "warp-drive"],
    ),
    (["bench", "quick", "--strategies", "nope"], ["--strategies", "nope"]),
    (["bench", "quick", "--scenarios", "nope"], ["--scenarios", "nope"]),
    (["bench", "quick", "--seeds", "0"], ["--seeds"]),
    (["bench", "quick", "--seeds", "x"], ["--seeds"]),
    (["bench", "quick", "--quiet", "--out", "{tmp}/o", "--set", "train.lr=0"], ["train.lr"]),
]


@pytest.fixture
def input_files(tmp_path: Path) -> Path:
    (tmp_path / "invalid.yaml").write_text("train: [\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "suite-bad-key.yaml").write_text(SUITE_BAD_KEY)
    (tmp_path / "suite-bad-scenario.yaml").write_text(SUITE_BAD_SCENARIO)
    (tmp_path / "suite-bad-strategy.yaml").write_text(SUITE_BAD_STRATEGY)
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "fragments"), BAD_ARGV, ids=[" ".join(a)[:60] for a, _ in BAD_ARGV]
)
def test_bad_input_exit_2_one_error_line(
    capsys: pytest.CaptureFixture[str],
    input_files: Path,
    argv: list[str],
    fragments: list[str],
) -> None:
    tmp = str(input_files)
    rc = main([a.replace("{tmp}", tmp) for a in argv])
    captured = capsys.readouterr()
    line = _assert_one_error_line(captured.out, captured.err)
    assert rc == 2, line
    for fragment in fragments:
        # typer < 0.28 names a missing argument in upper case ('CONFIG'), later ones not.
        wanted = fragment.replace("{tmp}", tmp)
        assert wanted in line or (wanted == "config" and "CONFIG" in line), line
    # Bad input never starts a run, so no run directory appears.
    assert not (input_files / "o" / "runs").exists()


def test_dataset_without_path_names_data_path(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", HETERO, "--quiet", "--set", "data.name=npz"])
    line = _assert_one_error_line(*capsys.readouterr())
    assert rc == 2
    assert "data.path" in line


def test_override_through_list_scalar_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", HETERO, "--quiet", "--set", "model.hidden.0.x=1"])
    line = _assert_one_error_line(*capsys.readouterr())
    assert rc == 2
    assert "model.hidden.0" in line


def test_non_utf8_config_is_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"name: x\n\xff: 1\n")
    rc = main(["train", str(path), "--quiet"])
    line = _assert_one_error_line(*capsys.readouterr())
    assert rc == 2
    assert str(path) in line


def test_suite_with_non_json_option_is_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: s\nscenarios: [microcloud-hetero]\nideal: false\n"
        "strategies: [{label: a, strategy: dlion, options: {rho: 2020-01-01}}]\n"
    )
    rc = main(["bench", str(suite), "--quiet", "--out", str(tmp_path / "o")])
    line = _assert_one_error_line(*capsys.readouterr())
    assert rc == 2
    assert "rho" in line


def test_console_script_bad_config_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "cluster:\n"
        "  sites: [{name: a}]\n"
        "  workers: [{site: a, capacity_gflops: 1}]\n"
        "train: {lr: -1}\n"
    )
    script = Path(sys.executable).parent / "dlion"
    assert script.is_file()
    env = {**os.environ, "COLUMNS": "40"}  # a narrow terminal must not wrap the line
    proc = subprocess.run(
        [str(script), "train", str(config), "--quiet", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    line = _assert_one_error_line(proc.stdout, proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert str(config) in line
    assert "train.lr" in line
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- train


def test_train_tiny_run_writes_outputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            HETERO,
            "--quiet",
            "--out",
            str(out),
            "--set",
            "train.max_time=0.3",
            "--set",
            "evaluation.every_s=0.1",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.out + captured.err
    assert "summary.json" in captured.out

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["scenario"] == HETERO
    assert summary["strategy"] == "dlion"
    assert summary["seed"] == 0
    assert summary["engine"] == "sim"
    assert summary["target_acc"] == 0.945
    assert 0.0 <= summary["final_acc"] <= 1.0
    assert 0.0 < summary["time_s"] <= 0.3 + 1e-9
    assert summary["bytes_sent"] > 0
    assert summary["tta_s"] is None or summary["tta_s"] <= summary["time_s"]

    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines
    events = [json.loads(line) for line in lines]
    assert all(isinstance(e, dict) and "event" in e for e in events)
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) >= 3  # t = 0, 0.1, 0.2, (0.3)
    for e in evals:
        assert {"t", "mean_acc", "min_acc"} <= set(e)
        assert 0.0 <= e["min_acc"] <= e["mean_acc"] + 1e-9 <= 1.0 + 1e-9
    times = [e["t"] for e in evals]
    assert times == sorted(times)
    assert evals[-1]["mean_acc"] == pytest.approx(summary["final_acc"])

    png = out / "accuracy_vs_time.png"
    assert png.read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------- bench


def test_bench_tiny_suite_and_reuse(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    suite = tmp_path / "tiny.yaml"
    suite.write_text(
        "name: tiny\n"
        "scenarios: [microcloud-hetero]\n"
        "strategies:\n"
        "  - {label: allreduce, strategy: allreduce}\n"
        "  - {label: dlion, strategy: dlion}\n"
        "seeds: 1\n"
        "ideal: true\n"
        "set: [train.max_time=0.3]\n"
    )
    out = tmp_path / "bench"
    argv = ["bench", str(suite), "--quiet", "--out", str(out)]

    assert main(argv) == 0, capsys.readouterr().err
    first = capsys.readouterr()
    assert "Traceback" not in first.out + first.err

    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert len(runs) == 3
    assert sorted(r["strategy"] for r in runs) == ["allreduce", "dlion", "ideal"]
    assert {r["scenario"] for r in runs} == {HETERO}
    for run in runs:
        assert set(run) >= SUMMARY_KEYS
        assert run["time_s"] <= 0.3 + 1e-9
    report = (out / "report.md").read_text()
    assert "allreduce" in report and "dlion" in report
    pngs = sorted(out.glob("*.png"))
    assert pngs
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)

    metrics = sorted(out.glob("runs/**/metrics.jsonl"))
    assert len(metrics) == 3
    before = {p: p.stat().st_mtime_ns for p in metrics}

    assert main(argv) == 0, capsys.readouterr().err
    second = capsys.readouterr()
    assert "Traceback" not in second.out + second.err
    assert {p: p.stat().st_mtime_ns for p in metrics} == before, "finished runs were rerun"
    again = json.loads((out / "summary.json").read_text())
    assert again["runs"] == runs
