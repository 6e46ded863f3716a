"""Tests for `dlion hybrid ...` in-process: train, eval, route, bench, and bad input (exit 2,
one `error:` line on stderr, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dlion.cli.commands import main
from dlion.data import load_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "train.edge_epochs=2",
    "train.cloud_epochs=2",
    "train.round_edge_epochs=1",
    "router.epochs=3",
    "edge.hidden=[8]",
    "cloud.hidden=[8]",
    "cloud.channels=[4]",
    "router.hidden=[8]",
]
TINY_ARGS = [arg for item in TINY for arg in ("--set", item)]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "run"
    assert main(["hybrid", "train", "digits", *TINY_ARGS, "--out", str(path), "--quiet"]) == 0
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = load_dataset("digits")
    path = tmp_path_factory.mktemp("inputs") / "x.npz"
    np.savez(path, x=ds.x_test[:30].numpy(), y=ds.y_test[:30].numpy())
    return path


def test_train_writes_a_complete_run(run_dir: Path) -> None:
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "edge.safetensors",
        "router.safetensors",
        "cloud.safetensors",
        "calibration.json",
        "config.yaml",
        "run.json",
    } <= names
    for name in ("edge", "router", "cloud"):  # safetensors: 8-byte header length, JSON header
        assert (run_dir / f"{name}.safetensors").read_bytes()[8:9] == b"{"


def test_eval_prints_each_coverage_and_writes_the_curve(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["hybrid", "eval", str(run_dir), "--coverage", "0.6,0.9", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    for text in (
        "0.60",
        "0.90",
        "router",
        "entropy threshold",
        "oracle router",
        "cloud-only",
        "edge-only",
        "latency (ms)",
        "to cloud (%)",
    ):
        assert text in out
    assert (tmp_path / "accuracy_vs_latency.png").read_bytes()[:8] == PNG_MAGIC
    ev = json.loads((tmp_path / "eval.json").read_text())
    targets = {p["target"] for p in ev["points"] if p["method"] == "router"}
    assert targets == {0.6, 0.9}


def test_route_reports_what_went_to_the_cloud(
    run_dir: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "routed.json"
    code = main(
        ["hybrid", "route", str(run_dir), str(inputs), "--coverage", "0.7", "--out", str(out_file)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "30 inputs" in out and "sent to the cloud" in out and "accuracy" in out
    routed = json.loads(out_file.read_text())
    where = [d["where"] for d in routed["inputs"]]
    assert len(where) == 30 and set(where) <= {"edge", "cloud"}
    sent = [d["index"] for d in routed["inputs"] if d["where"] == "cloud"]
    assert f"{len(sent)} sent to the cloud" in out


def _npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


# (argv builder, fragment the error line must contain)
BAD_CASES = [
    ("missing run dir", lambda r, i, t: ["eval", str(t / "nope")], "no such run directory"),
    ("coverage 0", lambda r, i, t: ["eval", str(r), "--coverage", "0"], "(0, 1]"),
    ("coverage 1.5", lambda r, i, t: ["eval", str(r), "--coverage", "0.5,1.5"], "(0, 1]"),
    ("coverage -0.2", lambda r, i, t: ["route", str(r), str(i), "--coverage", "-0.2"], "(0, 1]"),
    ("coverage text", lambda r, i, t: ["eval", str(r), "--coverage", "most"], "not a number"),
    ("run dir is a file", lambda r, i, t: ["eval", str(i)], "not a directory"),
    ("not a run", lambda r, i, t: ["eval", str(t)], "run.json: missing"),
    ("missing inputs", lambda r, i, t: ["route", str(r), str(t / "x.npz")], "no such file"),
    (
        "wrong shape",
        lambda r, i, t: ["route", str(r), _npz(t / "a.npz", x=np.zeros((3, 64), np.float32))],
        "needs (n, 1, 8, 8)",
    ),
    (
        "no x",
        lambda r, i, t: ["route", str(r), _npz(t / "b.npz", y=np.zeros(3, np.int64))],
        "missing array 'x'",
    ),
    (
        "nan input",
        lambda r, i, t: ["route", str(r), _npz(t / "c.npz", x=np.full((2, 1, 8, 8), np.nan))],
        "NaN",
    ),
    (
        "label out of range",
        lambda r, i, t: [
            "route",
            str(r),
            _npz(t / "d.npz", x=np.zeros((2, 1, 8, 8)), y=np.array([1, 10])),
        ],
        "10 classes",
    ),
    ("not an npz", lambda r, i, t: ["route", str(r), str(r / "run.json")], "not an npz"),
    ("unknown preset", lambda r, i, t: ["train", "cifar99"], "not a config file or a preset"),
    ("bad field", lambda r, i, t: ["train", "digits", "--set", "train.rounds=-1"], "train.rounds"),
    ("unknown key", lambda r, i, t: ["train", "digits", "--set", "router.depth=2"], "router.depth"),
    (
        "unknown model",
        lambda r, i, t: ["train", "digits", "--set", "cloud.name=resnet"],
        "cloud.name: unknown model 'resnet'",
    ),
    ("bench dataset", lambda r, i, t: ["bench", "--datasets", "imagenet"], "--datasets"),
    ("bench seeds", lambda r, i, t: ["bench", "--seeds", "0", "--out", str(t)], "--seeds"),
]


@pytest.mark.parametrize(("case", "argv", "fragment"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_one_error_line_and_exit_2(
    case: str,
    argv: object,
    fragment: str,
    run_dir: Path,
    inputs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    capsys.readouterr()
    args = argv(run_dir, inputs, tmp_path)  # type: ignore[operator]
    assert main(["hybrid", *args]) == 2
    assert fragment in _one_error_line(capsys)


def test_bad_yaml_config_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: digits\n  val_fraction: 0.9\n")
    assert main(["hybrid", "train", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "data.val_fraction" in line


def test_tampered_run_is_refused_and_nothing_written(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "run"
    bad.mkdir()
    for f in run_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "cloud.safetensors").read_bytes())
    data[-1] ^= 0x01
    (bad / "cloud.safetensors").write_bytes(bytes(data))
    before = sorted(p.name for p in bad.iterdir())
    capsys.readouterr()
    assert main(["hybrid", "eval", str(bad)]) == 2
    assert "cloud.safetensors: checksum mismatch" in _one_error_line(capsys)
    assert sorted(p.name for p in bad.iterdir()) == before  # no eval.json, no plot


def test_bench_writes_tables_and_reuses_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "hybrid",
        "bench",
        "--out",
        str(tmp_path),
        "--datasets",
        "digits",
        "--seeds",
        "1",
        "--coverage",
        "0.6,0.8",
        *TINY_ARGS,
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gap closed" in out and "lowest latency" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["dataset"] for r in summary["runs"]] == ["digits"]
    report = (tmp_path / "report.md").read_text()
    assert "| digits | 0.60 |" in report and "accuracy_vs_latency_digits.png" in report
    assert (tmp_path / "accuracy_vs_latency_digits.png").read_bytes()[:8] == PNG_MAGIC
    assert main(argv) == 0
    assert "reused 1 finished run" in capsys.readouterr().out
