"""Checkpoints: atomic writes, refusal of truncated/tampered/foreign checkpoints, and exact
resume of sim runs (the resumed run's metrics equal the uninterrupted run's)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import dlion.core.checkpoint as ck
from dlion.cli.commands import main
from dlion.comm.messages import Message
from dlion.context import ComputeResult, WorkerContext
from dlion.core.checkpoint import (
    CheckpointError,
    config_hash,
    latest_step_dir,
    load_latest,
    save_checkpoint,
)
from dlion.core.config import CheckpointConfig, ExperimentConfig, config_from_dict
from dlion.engines.sim import run_sim
from dlion.engines.sim_checkpoint import checkpoint_root, experiment_hash
from dlion.strategies.dlion_hpdc21 import LinkResidual
from dlion.training.replica import Replica
from helpers import small_config

H = "0" * 64
WALL_KEYS = {"wall_s", "compute_wall_s", "eval_wall_s", "peak_rss_mb"}


def _tensors(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((5,), v), "g": torch.arange(4, dtype=torch.uint8)}


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: 'nothing was modified' is tree equality."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------- the format


def test_roundtrip_latest_and_keep(tmp_path: Path) -> None:
    for step in range(4):
        save_checkpoint(tmp_path, step, _tensors(step), {"it": step}, config_hash=H, keep=2)
    got = load_latest(tmp_path, H)
    assert got.step == 3 and got.state == {"it": 3}
    assert torch.equal(got.tensors["w"], torch.full((5,), 3.0))
    assert got.tensors["g"].dtype == torch.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000002", "00000003", "latest"]


def test_resaving_an_earlier_step_drops_the_abandoned_future(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _tensors(step), {}, config_hash=H, keep=5)
    save_checkpoint(tmp_path, 2, _tensors(9), {}, config_hash=H, keep=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000001", "00000002", "latest"]
    assert float(load_latest(tmp_path, H).tensors["w"][0]) == 9.0


def test_crash_while_writing_tensors_leaves_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, 1, _tensors(1), {"it": 1}, config_hash=H)
    before = _tree(tmp_path)

    def half_written(tensors: dict[str, torch.Tensor], path: str) -> None:
        Path(path).write_bytes(b"\x08\x00\x00")  # a few bytes, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, _tensors(2), {"it": 2}, config_hash=H)
    assert _tree(tmp_path) == before  # no temp directory, no new step, same pointer
    assert load_latest(tmp_path, H).state == {"it": 1}


def test_crash_before_latest_moves_keeps_previous_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, 1, _tensors(1), {"it": 1}, config_hash=H)

    def crash(root: Path, name: str) -> None:
        raise KeyboardInterrupt  # killed between the rename and the pointer update

    monkeypatch.setattr(ck, "_point_latest", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _tensors(2), {"it": 2}, config_hash=H)
    assert load_latest(tmp_path, H).state == {"it": 1}


def test_leftover_temp_directory_is_ignored_then_cleaned(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _tensors(1), {}, config_hash=H)
    (tmp_path / ".tmp-00000002-dead").mkdir()
    assert load_latest(tmp_path, H).step == 1
    save_checkpoint(tmp_path, 2, _tensors(2), {}, config_hash=H)
    assert not list(tmp_path.glob(".tmp-*"))


def _damage_truncate(step: Path) -> None:
    data = (step / ck.TENSORS).read_bytes()
    (step / ck.TENSORS).write_bytes(data[: len(data) // 2])


def _damage_flip_tensor_byte(step: Path) -> None:
    data = bytearray((step / ck.TENSORS).read_bytes())
    data[-3] ^= 0x01
    (step / ck.TENSORS).write_bytes(bytes(data))


def _damage_edit_meta(step: Path) -> None:
    meta = json.loads((step / ck.META).read_text())
    meta["state"]["it"] = 99
    (step / ck.META).write_text(json.dumps(meta))


def _damage_truncate_meta(step: Path) -> None:
    text = (step / ck.META).read_text()
    (step / ck.META).write_text(text[: len(text) // 2])


def _damage_delete_tensors(step: Path) -> None:
    (step / ck.TENSORS).unlink()


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_damage_truncate, "truncated"),
        (_damage_flip_tensor_byte, "SHA-256 mismatch"),
        (_damage_edit_meta, "metadata modified"),
        (_damage_truncate_meta, "not readable JSON"),
        (_damage_delete_tensors, "missing"),
    ],
)
def test_damaged_checkpoint_is_refused_and_left_alone(
    tmp_path: Path, damage: Any, why: str
) -> None:
    save_checkpoint(tmp_path, 1, _tensors(1), {"it": 1}, config_hash=H)
    damage(latest_step_dir(tmp_path))
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match=why) as err:
        load_latest(tmp_path, H)
    assert "\n" not in str(err.value)
    assert _tree(tmp_path) == before


def test_other_config_and_missing_pointer_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_latest(tmp_path / "nope", H)
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(CheckpointError, match="missing latest"):
        load_latest(tmp_path, H)
    save_checkpoint(tmp_path, 1, _tensors(1), {}, config_hash=H)
    with pytest.raises(CheckpointError, match="another config"):
        load_latest(tmp_path, "1" * 64)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="does not name a step"):
        load_latest(tmp_path, H)


def test_nan_tensor_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.tensor([1.0, float("nan")])}, {}, config_hash=H)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_latest(tmp_path, H)


def test_config_hash_ignores_only_the_listed_fields() -> None:
    raw = {"train": {"max_time": 5, "lr": 0.1}, "checkpoint": {"every_s": 1}}
    drop = ["train.max_time", "checkpoint"]
    same = {"train": {"max_time": 50, "lr": 0.1}, "checkpoint": {"every_s": 3}}
    other = {"train": {"max_time": 5, "lr": 0.2}, "checkpoint": {"every_s": 1}}
    assert config_hash(raw, drop) == config_hash(same, drop)
    assert config_hash(raw, drop) != config_hash(other, drop)


# ----------------------------------------------------------------------------- sim resume


# Membership changes on both sides of the checkpoint (t=0.2): a crash detected after the
# peer timeout, then a join that fetches state from a live peer.
CHURN = {
    "membership": [
        {"at_s": 0.15, "rank": 2, "event": "crash"},
        {"at_s": 0.25, "rank": 2, "event": "join", "startup_s": 0.02},
    ]
}


def _cfg(
    strategy: str = "allreduce", dynamics: dict[str, Any] | None = None, **train: Any
) -> ExperimentConfig:
    cfg = small_config(
        strategy=strategy,
        workers=[{"site": "a", "capacity_gflops": 1.0, "count": 3 if dynamics else 2}],
        train={"max_time": 0.4, "stop_at_target": False, **train},
        evaluation={"every_s": 0.1},
        engine={"peer_timeout": 0.03, "recv_timeout": 0.05} if dynamics else None,
    )
    raw = cfg.model_dump(mode="json")
    raw["checkpoint"] = {"every_s": 0.1}
    raw["dynamics"] = dynamics or {}
    return config_from_dict(raw)


def _summary(out: Path) -> dict[str, Any]:
    s = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in WALL_KEYS}


def _interrupted(cfg: ExperimentConfig, out: Path, stop_at: float = 0.2) -> None:
    halted = run_sim(cfg, out_dir=out, progress=False, stop_at=stop_at)
    assert halted.summary["stopped_at"] == pytest.approx(stop_at)
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize(
    ("strategy", "dynamics"),
    [
        ("allreduce", None),
        ("dlion", CHURN),
        ("dlion-hpdc21", CHURN),
        pytest.param("ako", CHURN, marks=pytest.mark.slow),
        pytest.param("adpsgd", CHURN, marks=pytest.mark.slow),
    ],
)
def test_resumed_sim_run_equals_uninterrupted(
    tmp_path: Path, strategy: str, dynamics: dict[str, Any] | None
) -> None:
    cfg = _cfg(strategy, dynamics)
    run_sim(cfg, out_dir=tmp_path / "full", progress=False)
    _interrupted(cfg, tmp_path / "part")
    resumed = run_sim(cfg, out_dir=tmp_path / "part", progress=False, resume=True)
    full, part = tmp_path / "full", tmp_path / "part"
    assert (part / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    assert _summary(part) == _summary(full)
    assert resumed.points[-1].t == pytest.approx(0.4)
    kept = load_latest(checkpoint_root(part), experiment_hash(cfg)).tensors
    if strategy == "dlion-hpdc21":  # strategy state kept with ctx.keep_state travels along
        assert kept["rank0.strategy.residual.1"].shape == kept["rank0.params"].shape
    if dynamics:
        changes = [m["event"] for m in resumed.summary["membership"]]
        assert changes == ["crash", "crash_detected", "join_started", "join"]
    # Checkpoints kept going after the resume: the newest is the last evaluation point.
    assert latest_step_dir(checkpoint_root(part)).name == "00000004"


def test_resume_with_longer_max_time_continues_the_run(tmp_path: Path) -> None:
    """A finished run's last checkpoint extends it: same metrics as a longer run."""
    run_sim(_cfg(max_time=0.3), out_dir=tmp_path / "a", progress=False)
    run_sim(_cfg(max_time=0.4), out_dir=tmp_path / "a", progress=False, resume=True)
    run_sim(_cfg(max_time=0.4), out_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "a/metrics.jsonl").read_bytes() == (
        tmp_path / "b/metrics.jsonl"
    ).read_bytes()


def test_resume_refusals_leave_the_run_directory_untouched(tmp_path: Path) -> None:
    cfg = _cfg()
    out = tmp_path / "run"
    _interrupted(cfg, out)
    before = _tree(out)
    other = _cfg(lr=0.01)
    with pytest.raises(CheckpointError, match="another config"):
        run_sim(other, out_dir=out, progress=False, resume=True)
    with pytest.raises(CheckpointError, match="max_time"):
        run_sim(_cfg(max_time=0.2), out_dir=out, progress=False, resume=True)
    assert _tree(out) == before
    # The history up to the checkpoint was edited: refused before the replay starts.
    metrics = out / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes().replace(b'"start"', b'"strat"', 1))
    before = _tree(out)
    with pytest.raises(CheckpointError, match="history up to the checkpoint was modified"):
        run_sim(cfg, out_dir=out, progress=False, resume=True)
    assert _tree(out) == before


def test_replay_that_diverges_from_the_checkpoint_is_refused(tmp_path: Path) -> None:
    """A checkpoint that is intact but not what this config produces (as if written by
    other code): the replay notices at the checkpoint, and nothing is written."""
    cfg = _cfg()
    out = tmp_path / "run"
    _interrupted(cfg, out)
    got = load_latest(checkpoint_root(out), experiment_hash(cfg))
    tensors = dict(got.tensors)
    tensors["rank1.optim.0.momentum_buffer"] = tensors["rank1.optim.0.momentum_buffer"] + 1e-6
    save_checkpoint(
        checkpoint_root(out), got.step, tensors, got.state, config_hash=experiment_hash(cfg)
    )
    before = _tree(out)
    with pytest.raises(CheckpointError, match=r"rank1\.optim\.0\.momentum_buffer differs"):
        run_sim(cfg, out_dir=out, progress=False, resume=True)
    assert _tree(out) == before


# ----------------------------------------------------------------------------- CLI


def test_cli_stop_resume_and_tampered_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = str(tmp_path / "run")
    common = ["train", str(path), "--quiet", "--checkpoint-every", "0.1"]
    assert main([*common, "--out", out, "--stop-at", "0.2"]) == 0
    assert "--resume" in capsys.readouterr().out
    step = latest_step_dir(checkpoint_root(Path(out)))
    pristine = (step / ck.TENSORS).read_bytes()
    (step / ck.TENSORS).write_bytes(pristine[:-1] + bytes([pristine[-1] ^ 1]))
    capsys.readouterr()
    assert main([*common, "--resume", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "SHA-256" in err and len(err.splitlines()) == 1
    (step / ck.TENSORS).write_bytes(pristine)
    assert main([*common, "--resume", out, "--out", str(tmp_path / "elsewhere")]) == 2
    assert main([*common, "--resume", str(tmp_path / "missing")]) == 2
    assert main([*common, "--resume", out]) == 0
    assert json.loads((Path(out) / "summary.json").read_text())["time_s"] == pytest.approx(0.4)


# ----------------------------------------------------------------------------- strategy state


class _Ctx(WorkerContext):
    """A context with no engine: only the bookkeeping under test is used."""

    def now(self) -> float:
        return 0.0

    async def compute(self, batch_size: int) -> ComputeResult:
        raise NotImplementedError

    async def _transmit(self, dst: int, msg: Message, wire_bytes: int) -> float:
        raise NotImplementedError


def _ctx() -> _Ctx:
    replica = Replica.from_tensors(
        torch.nn.Linear(2, 2),
        torch.zeros(4, 2),
        torch.zeros(4, dtype=torch.int64),
        lr=0.1,
        momentum=0.0,
        weight_decay=0.0,
        seed=0,
    )
    return _Ctx(
        rank=0,
        world=[0, 1],
        sites=["a", "a"],
        replica=replica,
        global_batch=2,
        recv_timeout=1.0,
        bandwidth_seed={1: 1e6},
        latency={1: 0.0},
    )


def test_kept_strategy_state_is_read_at_checkpoint_time_and_restored_once() -> None:
    ctx = _ctx()
    ctx.restore_state({"residual.1": torch.ones(3)})  # as a resumed dist worker has it
    link = LinkResidual(3, ctx.restored_state("residual.1"))
    assert torch.equal(link.residual, torch.ones(3))
    assert ctx.restored_state("residual.1") is None  # handed out once
    ctx.keep_state("residual.1", lambda: link.residual)
    link.residual = torch.full((3,), 2.0)  # the strategy rebinds it: the getter sees that
    assert torch.equal(ctx.strategy_state()["residual.1"], torch.full((3,), 2.0))
    ctx.drop_state("residual.1")
    assert ctx.strategy_state() == {}
    assert torch.equal(LinkResidual(3, torch.ones(4)).residual, torch.zeros(3))  # misfit: fresh


def test_replica_snapshot_restores_the_batch_order() -> None:
    a, b = _ctx().replica, _ctx().replica
    a.gradient(3)
    tensors, cursor = a.snapshot()
    b.restore(tensors, cursor)
    assert torch.equal(a._next_indices(6), b._next_indices(6))  # same batches from here on
    with pytest.raises(ValueError, match="params"):
        b.restore({**tensors, "params": torch.zeros(1)}, cursor)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path) -> None:
    """RELIABILITY 12: a sim run killed mid-way (events past its last checkpoint in
    metrics.jsonl, maybe a half-written checkpoint) resumes to the uninterrupted metrics."""
    cfg = _cfg(max_time=0.6)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "dlion.cli.commands",
        "train",
        str(path),
        "--quiet",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "latest").exists() and proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 120 s")
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "summary.json").exists(), "the run ended before it could be killed"
    run_sim(cfg, out_dir=out, progress=False, resume=True)
    run_sim(cfg, out_dir=tmp_path / "full", progress=False)
    assert (out / "metrics.jsonl").read_bytes() == (tmp_path / "full/metrics.jsonl").read_bytes()
    assert _summary(out) == _summary(tmp_path / "full")


def test_a_new_run_in_an_old_directory_drops_its_checkpoints(tmp_path: Path) -> None:
    _interrupted(_cfg(), tmp_path)
    run_sim(
        _cfg(max_time=0.1).model_copy(update={"checkpoint": CheckpointConfig()}),
        out_dir=tmp_path,
        progress=False,
    )
    assert not checkpoint_root(tmp_path).exists()
