"""The README's examples work as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlion.cli.commands import main
from dlion.cluster.topology import Cluster
from dlion.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "two-labs.yaml")


def test_example_config_loads_with_its_per_pair_override() -> None:
    cfg = load_config(EXAMPLE)
    cluster = Cluster.from_config(cfg.cluster)
    assert cluster.size == 4
    assert cluster.link(1, 3).bandwidth == pytest.approx(10e6 / 8)  # per-pair override
    assert cluster.link(0, 2).bandwidth == pytest.approx(50e6 / 8)  # site-to-site link
    assert cfg.strategy.options == {"dkt_every": 25}


def test_switching_strategy_on_the_cli_drops_the_files_strategy_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", EXAMPLE, "--strategy", "allreduce", "--quiet", "--out", str(out)]
    assert main([*args, "--set", "train.max_time=0.2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "allreduce"
    assert "two-labs allreduce" in capsys.readouterr().out


def test_the_custom_example_trains_its_own_resnet_on_its_own_image_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README "Train your own model": the example's files, run from a copy of its folder."""
    import shutil
    import sys

    folder = tmp_path / "custom"
    shutil.copytree(
        ROOT / "examples" / "custom", folder, ignore=shutil.ignore_patterns("data", "runs")
    )
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    for name in ("make_data", "images", "model"):
        sys.modules.pop(name, None)
    import make_data

    make_data.write_folders(folder / "data", size=16, limit=200)
    out = folder / "runs" / "sim"
    args = ["train", "config.yaml", "--quiet", "--out", str(out)]
    assert main([*args, "--set", "train.max_time=20", "--set", "train.target_acc=0.5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_acc"] > 0.3  # 10 classes: well above chance after a few steps
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "matches summary.json" in capsys.readouterr().out
    for name in ("make_data", "images", "model"):
        sys.modules.pop(name, None)
