"""`dlion transient bench | perf`: tiny runs end to end, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlion.cli.commands import main
from dlion.transient.bench import BenchSpec, run_bench
from dlion.transient.catalog import load_catalog
from dlion.transient.spec import TransientSpec


def test_paper_part_tiny(tmp_path: Path) -> None:
    spec = BenchSpec(workers=2, seeds=2, epochs=2, lr_grid=(0.02,))
    rec = run_bench(spec, load_catalog(), TransientSpec(), tmp_path, ["paper"], progress=False)
    p = rec["paper"]
    assert len(p["pairs"]) == 2
    for pair in p["pairs"]:
        # Same work split over 2 workers: faster than one, but not more than 2x.
        assert 1.0 < pair["speedup"] <= 2.05
        assert pair["one"]["revocations"] == 0
        assert pair["cost_saving"] == pytest.approx(1 - pair["many"]["usd"] / pair["one"]["usd"])
    assert json.loads((tmp_path / "summary.json").read_text())["paper"]["workers"] == 2


@pytest.mark.slow
def test_bench_cli_all_parts_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["transient", "bench", "--seeds", "1", "--workers", "2", "--epochs", "2",
         "--deadlines", "3", "--out", str(tmp_path), "--quiet"]
    )  # fmt: skip
    assert rc == 0
    rec = json.loads((tmp_path / "summary.json").read_text())
    assert set(rec) >= {"paper", "strategies", "planner"}
    assert "Planner" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["transient", "bench", "--parts", "paper,x"], "--parts: unknown part 'x'"),
        (["transient", "bench", "--deadlines", "1,soon"], "--deadlines"),
        (["transient", "bench", "--deadlines", "-1"], "--deadlines: must be positive"),
        (["transient", "bench", "--instance", "tpu"], "unknown instance type 'tpu'"),
        (["transient", "perf", "--configs", "8", "--held-out", "6"], "--held-out"),
    ],
)
def test_bad_input_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    rc = main([*args, "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err
