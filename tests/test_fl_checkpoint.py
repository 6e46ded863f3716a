"""FL server checkpoints: atomic safetensors + JSON, resume, and refusal of bad checkpoints
(one line, exit 2, nothing overwritten)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dlion.cli.commands import main
from dlion.fl.checkpoint import CheckpointError, load_checkpoint
from dlion.fl.config import FLConfig, with_fl_changes
from dlion.jobs.fl_sim import run_fl
from fl_helpers import tiny


def _cfg(**changes: str) -> FLConfig:
    cfg = tiny(checkpoint={"every_s": 2}, algorithm={"name": "fedbuff", "options": {"k": 2}})
    return with_fl_changes(cfg, [f"{k}={v}" for k, v in changes.items()])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_checkpoints_are_written_and_resume_continues(tmp_path: Path) -> None:
    cfg = _cfg()
    first = run_fl(cfg, out_dir=tmp_path, progress=False)
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    # Checkpoints at 2, 4, 6, 8 s; the two newest are kept; no temp files left behind.
    assert files == ["00000002", "00000003", "latest"]
    meta = json.loads((tmp_path / "checkpoint" / "00000003" / "meta.json").read_text())["state"]
    assert meta["time"] == 8 and meta["version"] == first.summary["iterations"]
    # The saved model is the final global model (the last eval happened at 12 s).
    restored = load_checkpoint(tmp_path, with_fl_changes(cfg, ["train.max_time=14"]))
    assert torch.equal(restored.tensors["model"], first.model)
    assert "algo.buffer" in restored.tensors

    longer = with_fl_changes(cfg, ["train.max_time=14"])
    second = run_fl(longer, out_dir=tmp_path, progress=False, resume=tmp_path)
    s = second.summary
    assert s["resumed_from_s"] == 8 and s["time_s"] == 14
    assert second.points[0].t == 8 and second.points[0].iteration == meta["version"]
    assert second.points[0].mean_acc == first.points[-1].mean_acc
    assert s["iterations"] > meta["version"]
    # Run totals continue: bytes and departures count from the checkpoint's values on.
    assert second.points[0].bytes_sent == first.summary["bytes_sent"] == meta["bytes_sent"]
    assert s["bytes_sent"] > first.summary["bytes_sent"]
    assert s["vanished"] >= first.summary["vanished"] == meta["vanished"]
    assert s["server"]["merged"] > first.summary["server"]["merged"]
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("resume") == 1  # appended to the history


@pytest.mark.parametrize("keep", [1, 3])
def test_checkpoint_keep_is_honoured(tmp_path: Path, keep: int) -> None:
    """checkpoint.keep (issue 19: it was a fixed 2): checkpoints at 2, 4, 6, 8 s (seq 0-3),
    the newest `keep` stay."""
    run_fl(_cfg(**{"checkpoint.keep": str(keep)}), out_dir=tmp_path, progress=False)
    kept = sorted(p.name for p in (tmp_path / "checkpoint").iterdir() if p.is_dir())
    assert kept == [f"{i:08d}" for i in range(4 - keep, 4)]


def test_refused_checkpoints_leave_everything_untouched(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_fl(_cfg(), out_dir=run, progress=False)
    longer = _cfg(**{"train.max_time": "14"})

    # Another config (other algorithm options).
    other = _cfg(**{"train.max_time": "14", "algorithm.options.k": "3"})
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match="written for another config"):
        run_fl(other, out_dir=run, progress=False, resume=run)
    assert _snapshot(run) == before

    # Already past the time budget.
    with pytest.raises(CheckpointError, match=r"raise train\.max_time"):
        run_fl(_cfg(), out_dir=run, progress=False, resume=run)

    tensors = run / "checkpoint" / "00000003" / "tensors.safetensors"
    data = tensors.read_bytes()
    # Tampered: one byte of a weight flipped.
    tensors.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        run_fl(longer, out_dir=run, progress=False, resume=run)
    assert _snapshot(run) == before
    # Truncated.
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        run_fl(longer, progress=False, resume=run)
    # Metadata garbage.
    tensors.write_bytes(data)
    (run / "checkpoint" / "00000003" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_checkpoint(run, longer)
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_checkpoint(tmp_path / "nope", longer)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, longer)


def test_cli_resume_refusal_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path = tmp_path / "fl.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg().model_dump(mode="json")))
    run = tmp_path / "run"
    assert main(["train", str(cfg_path), "--out", str(run), "--quiet"]) == 0
    tensors = run / "checkpoint" / "00000003" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    before = _snapshot(run)
    capsys.readouterr()
    code = main(
        ["train", str(cfg_path), "--resume", str(run), "--quiet", "--set", "train.max_time=14"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "truncated" in err and "\n" not in err
    assert _snapshot(run) == before


@pytest.mark.parametrize("name", ["ca2fl", "fadas", "fedcompass", "fedpace"])
def test_newer_algorithms_checkpoint_and_resume(tmp_path: Path, name: str) -> None:
    cfg = tiny(checkpoint={"every_s": 2}, algorithm={"name": name, "options": {"k": 2}})
    run_fl(cfg, out_dir=tmp_path, progress=False)
    longer = with_fl_changes(cfg, ["train.max_time=12"])
    restored = load_checkpoint(tmp_path, longer)
    assert any(k.startswith("algo.") for k in restored.tensors)  # its state was saved
    second = run_fl(longer, out_dir=tmp_path, progress=False, resume=tmp_path)
    assert second.summary["resumed_from_s"] == 8 and second.summary["time_s"] == 12
    assert torch.isfinite(second.model).all()
