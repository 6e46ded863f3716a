"""`dlion plan` and `dlion transient catalog` in-process: outputs and one-line bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlion.cli.commands import main

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = [
    "homogeneous",
    "--types",
    "aws-p2.xlarge,aws-p2.8xlarge",
    "--counts",
    "2,4",
    "--profile-seeds",
    "2",
    "--draws",
    "30",
    "--quiet",
    "--set",
    "train.target_acc=0.85",
    "--set",
    "train.lr=0.01",
    "--set",
    "strategy.name=ps-asp",
]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def test_plan_deadline_writes_table_json_and_frontier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["plan", *SMALL, "--deadline", "3h", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "recommended:" in out and "P(meet deadline 3.00 h)" in out
    assert "E[time] (h)" in out and "E[cost] ($)" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["goal"] == "deadline" and plan["limit"] == 3 * 3600
    assert len(plan["candidates"]) == 2 * 2 * 2  # types x counts x tiers
    rec = next(c for c in plan["candidates"] if c["cluster"] == plan["recommended"])
    assert rec["probability"] >= 0.9
    cheaper_sure = [
        c
        for c in plan["candidates"]
        if c["probability"] >= 0.9 and c["mean_cost_usd"] < rec["mean_cost_usd"]
    ]
    assert not cheaper_sure  # nothing cheaper meets the deadline as surely
    profiled = plan["profiles"]["iterations_to_target"]
    assert {t: set(v) for t, v in profiled.items()} == {
        "aws-p2.xlarge": {"2", "4"},
        "aws-p2.8xlarge": {"2", "4"},
    }
    assert (tmp_path / "frontier.png").read_bytes()[:8] == PNG


def test_plan_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["plan", *SMALL, "--budget", "$5", "--tiers", "transient", "--out", str(tmp_path)])
    assert rc == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["goal"] == "budget"
    assert {c["tier"] for c in plan["candidates"]} == {"transient"}
    rec = next(c for c in plan["candidates"] if c["cluster"] == plan["recommended"])
    faster_sure = [
        c
        for c in plan["candidates"]
        if c["probability"] >= 0.9 and c["mean_time_s"] < rec["mean_time_s"]
    ]
    assert not faster_sure


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["homogeneous"], "exactly one of --deadline or --budget"),
        (["homogeneous", "--deadline", "2h", "--budget", "3"], "exactly one of"),
        (["homogeneous", "--deadline", "soon"], "--deadline: cannot read 'soon'"),
        (["homogeneous", "--deadline", "-2h"], "--deadline"),
        (["homogeneous", "--budget", "-5"], "--budget: must be a positive amount"),
        (["homogeneous", "--budget", "5", "--types", "tpu"], "unknown instance type 'tpu'"),
        (["homogeneous", "--budget", "5", "--counts", "2,x"], "--counts: expected"),
        (["homogeneous", "--budget", "5", "--counts", "0"], "--counts: worker counts must be"),
        (["homogeneous", "--budget", "5", "--tiers", "spot"], "--tiers: unknown tier 'spot'"),
        (["homogeneous", "--budget", "5", "--confidence", "1.5"], "--confidence"),
        (["homogeneous", "--budget", "5", "--draws", "0"], "--draws"),
        (["homogeneous", "--budget", "5", "--time-scale", "0"], "--time-scale: must be > 0"),
        (["homogeneous", "--budget", "5", "--catalog", "{tmp}/bad.yaml"], "bad.yaml:"),
        (["homogeneous", "--budget", "5", "--catalog", "{tmp}/none.yaml"], "not found"),
        (["nope.yaml", "--budget", "5"], "nope.yaml"),
    ],
)
def test_plan_bad_input_exit_2_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    (tmp_path / "bad.yaml").write_text("instances:\n  - name: x\n    peak_gflops: -1\n")
    argv = ["plan", *[a.replace("{tmp}", str(tmp_path)) for a in args], "--quiet"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in _one_error_line(err)


def test_catalog_lists_types(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["transient", "catalog"]) == 0
    out = capsys.readouterr().out
    assert "gcp-n1-4-k80" in out and "weibull" in out and "max 24.0 h" in out
