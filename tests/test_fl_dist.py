"""FL dist mode end to end: a server process and one process per client.

Real jobs (3 clients, digits): a client SIGKILLed mid-run is abandoned and the others
reach the target; clients with a wrong or missing shared secret are refused (exit 2) and
the server trains on with the rest; a server stopped by SIGTERM checkpoints and
`--resume` continues its clock, version and algorithm state; a checkpoint of another
config, a wrong client id or a bad address are one line and exit 2; and, as root with
network namespaces, the server and its clients run as separate commands in separate
namespaces (hosts). Each job costs ~20-40 s, mostly Python processes importing torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dlion.cli.commands import main
from dlion.comm.codec import encode
from dlion.comm.job import Fault
from dlion.comm.messages import Control, Dense, Message
from dlion.core.errors import BadInput
from dlion.engines import netns
from dlion.fl.checkpoint import CheckpointError
from dlion.fl.config import FLConfig, with_fl_changes
from dlion.fl.processes import MAX_DIST_CLIENTS, FLProcess, join_as_client, run_fl_dist
from dlion.jobs.fl_sim import run_fl
from fl_helpers import tiny
from helpers import small_config
from netns_fixtures import cluster_up, needs_netns

DLION = [sys.executable, "-m", "dlion"]


def _cfg(clients: int = 3) -> FLConfig:
    return tiny(
        clients={
            "count": clients,
            "concurrency": min(clients, 3),
            "availability": {"mean_online_s": 10, "mean_offline_s": 0},
        },
        algorithm={"name": "fedasync"},
        train={"max_time": 30, "target_acc": 0.8, "stop_at_target": True},
        evaluation={"every_s": 0.25},
    )


def test_a_killed_client_is_abandoned_and_the_others_reach_the_target(tmp_path: Path) -> None:
    cfg = _cfg()
    result = run_fl_dist(cfg, out_dir=tmp_path, faults=[Fault(2, at=0.5)])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == result.summary
    assert s["engine"] == "dist" and s["clients"] == 3
    assert s["signals"] == [{"rank": 2, "t": pytest.approx(0.5, abs=0.5), "signal": "KILL"}]
    # The server saw the kill through the broken link, long before the heartbeat timeout.
    [gone] = s["departures"]
    assert gone["rank"] == 2 and gone["t"] - 0.5 < cfg.engine.peer_timeout
    assert s["server"]["abandoned"] >= 1
    # The run went on with the other two, to the target, after the kill.
    assert s["tta_s"] is not None and s["tta_s"] > gone["t"]
    assert s["final_acc"] >= 0.8 and math.isfinite(s["final_loss"])
    assert s["server"]["merged"] > 0 and s["server"]["rejected_total"] == 0
    assert result.model.isfinite().all() and result.model.numel() > 0
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and "client_left" in kinds
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["t"] for e in evals] == sorted(e["t"] for e in evals)
    assert evals[-1]["iteration"] == s["iterations"] > 0
    assert (tmp_path / "partition.json").exists() and (tmp_path / "global_model.pt").exists()


def test_too_many_clients_for_processes_is_refused_before_launching(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=f"at most {MAX_DIST_CLIENTS}"):
        run_fl_dist(_cfg(MAX_DIST_CLIENTS + 1), out_dir=tmp_path)
    with pytest.raises(BadInput, match="client rank"):
        run_fl_dist(_cfg(), out_dir=tmp_path, faults=[Fault(0, at=1.0)])
    assert not (tmp_path / "summary.json").exists()


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_clients_without_the_secret_are_refused_and_the_server_trains_on(tmp_path: Path) -> None:
    """Client 2 proves a wrong secret, client 3 none: each exits 2 with one line naming
    the problem; the server records both and trains with client 1, its model intact."""
    cfg = with_fl_changes(
        _cfg(), ["engine.secret=right", "train.max_time=3", "train.stop_at_target=false"]
    )
    result = run_fl_dist(
        cfg,
        out_dir=tmp_path,
        rank_env={2: {"DLION_SECRET": "wrong"}, 3: {"DLION_SECRET": ""}},
    )
    s = result.summary
    assert s["client_exit_codes"] == {"1": 0, "2": 2, "3": 2}
    assert {r["rank"]: r["why"] for r in s["refused"]} == {
        2: "shared secret mismatch",
        3: "no shared secret given, and the job requires one",
    }
    assert sorted((d["rank"], d["why"]) for d in s["departures"]) == [
        (2, "refused"),
        (3, "refused"),
    ]
    for rank, needle in ((2, "shared secret mismatch"), (3, "no shared secret given")):
        lines = (tmp_path / "workers" / f"rank-{rank}.log").read_text().strip().splitlines()
        assert lines[-1].startswith(f"error: client {rank}: refused by the server: {needle}")
    assert s["server"]["merged"] > 0 and s["server"]["rejected_total"] == 0
    assert result.model.isfinite().all() and s["final_acc"] > 0.2
    # The secret is in no file of the run.
    assert not any(b"right" in data for data in _snapshot(tmp_path).values())


def test_frames_from_a_client_are_checked_before_the_server_sees_them() -> None:
    """What an admitted but broken or hostile client sends over its link: garbage, a frame
    speaking for another client, one over engine.max_message_mb: rejected and counted,
    never delivered; a well-formed one is delivered, and only from a linked client."""
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def reject(peer: int, why: str) -> None: ...

    def deliver(msg: Message) -> None: ...

    server = SimpleNamespace(
        transport=SimpleNamespace(max_frame_bytes=2_000),
        rank=0,
        _reject=reject,
        _deliver=deliver,
        _from_thread=lambda fn, *args: calls.append((fn.__name__, args)),
    )
    good = Message(1, 0, "fl", Dense(torch.ones(3)), 0.0, {"task": 1.0})
    spoofed = Message(2, 0, "fl", Control("checkin"), 0.0)
    huge = Message(1, 0, "fl", Dense(torch.ones(1_000)), 0.0)
    for frame in (b"\x00garbage", encode(spoofed), encode(huge), encode(good)):
        FLProcess._on_frame(server, 1, memoryview(frame))  # type: ignore[arg-type]
    assert [name for name, _ in calls] == ["reject", "reject", "reject", "deliver"]
    assert "claims 2->0" in calls[1][1][1] and "limit" in calls[2][1][1]
    delivered = calls[3][1][0]
    assert torch.equal(delivered.payload.values, torch.ones(3))
    mailbox: list[Message] = []
    linked = SimpleNamespace(
        live={1}, ctx=SimpleNamespace(mailbox=SimpleNamespace(deliver=mailbox.append))
    )
    FLProcess._deliver(linked, delivered)  # type: ignore[arg-type]
    FLProcess._deliver(linked, spoofed)  # type: ignore[arg-type]  (2 is not linked)
    assert mailbox == [delivered]


def _wait_for_eval(metrics: Path, t: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(e["event"] == "eval" and e["t"] >= t for e in _events(metrics)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no evaluation at t >= {t} (exit {proc.poll()})")


def test_sigterm_checkpoints_and_resume_continues_the_run(tmp_path: Path) -> None:
    """`dlion train --engine dist` stopped by SIGTERM: the server checkpoints the state it
    stopped in (model, version, time, CA2FL's cache); `--resume` starts there: same
    version and accuracy at its first evaluation, the clock and counters go on."""
    cfg = with_fl_changes(
        _cfg(),
        [
            "algorithm.name=ca2fl",
            "algorithm.options={k: 2}",
            "train.target_acc=0.99",
            "train.max_time=30",
            "checkpoint.every_s=1",
            "checkpoint.keep=3",
        ],
    )
    config = tmp_path / "fl.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*DLION, "train", str(config), "--engine", "dist", "--out", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_eval(run / "metrics.jsonl", 1.6, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out.decode()[-2000:]
    first = json.loads((run / "summary.json").read_text())
    assert first["stop_reason"] == "interrupted"
    metas = sorted((run / "checkpoint").glob("*/meta.json"))
    assert 1 <= len(metas) <= 3
    meta = json.loads(metas[-1].read_text())["state"]
    # The last checkpoint is the state at the stop, not the last periodic one.
    assert meta["version"] == first["iterations"] > 0
    assert meta["time"] == pytest.approx(first["time_s"], abs=1e-6) and meta["time"] >= 1.6
    tensors = load_file(str(metas[-1].parent / "tensors.safetensors"))
    assert tensors["algo.cache"].shape[1] == tensors["model"].numel()
    events = _events(run / "metrics.jsonl")
    assert [e["signal"] for e in events if e["event"] == "signal"] == ["SIGTERM"]

    longer = with_fl_changes(cfg, [f"train.max_time={meta['time'] + 2:.3f}"])
    result = run_fl_dist(longer, out_dir=run, resume=True)
    s = result.summary
    assert s["resumed_from_s"] == meta["time"] and s["resumed_version"] == meta["version"]
    p0 = result.points[len([e for e in events if e["event"] == "eval"])]
    assert p0.t >= meta["time"] and p0.iteration == meta["version"]
    assert p0.mean_acc == pytest.approx(first["final_acc"])  # the same model, not a fresh one
    assert s["iterations"] > meta["version"] and s["time_s"] >= meta["time"] + 1.9
    assert s["server"]["merged"] > first["server"]["merged"]
    assert s["bytes_sent"] > first["bytes_sent"]
    kinds = [e["event"] for e in result.events]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1


def test_bad_input_is_one_line_and_leaves_the_run_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint of another config (here: the same job on the sim), a client id outside
    the population, a malformed or missing server address: one line, exit 2, nothing
    started or written."""
    cfg = _cfg()
    sim = with_fl_changes(cfg, ["engine.name=sim", "checkpoint.every_s=2", "train.max_time=4"])
    run_fl(sim, out_dir=tmp_path, progress=False)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="written for another config"):
        run_fl_dist(cfg, out_dir=tmp_path, resume=True)
    config = tmp_path.parent / f"{tmp_path.name}-dist.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert main(["train", str(config), "--engine", "dist", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written for another config" in err[0]
    assert _snapshot(tmp_path) == before
    with pytest.raises(BadInput, match=r"--client-id 4: this config has clients 1\.\.3"):
        join_as_client(cfg, 4, None, "127.0.0.1:1")
    with pytest.raises(BadInput, match=r"--server 'no-port': expected HOST:PORT"):
        join_as_client(cfg, 1, None, "no-port")
    with pytest.raises(BadInput, match=r"--server HOST:PORT is required"):
        join_as_client(cfg, 1, None, None)


def test_a_crashed_client_rejoins_a_served_job_and_ctrl_c_checkpoints(tmp_path: Path) -> None:
    """`dlion fl serve` and `dlion fl client` as separate commands (here on one host):
    client 2 is SIGKILLed, the server drops it and frees its id, a new process for client
    2 joins the running job (incarnation 1) and trains; SIGINT then stops the server
    with a checkpoint (exit 130) and the clients end on the stop flag."""
    cfg = with_fl_changes(_cfg(), ["train.max_time=120", "train.stop_at_target=false"])
    config = tmp_path / "fl.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    address = "127.0.0.1:29531"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLION_SECRET": "s"}
    run = tmp_path / "run"

    def start(argv: list[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*DLION, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def client(k: int) -> subprocess.Popen[str]:
        return start(["fl", "client", str(config), "--server", address, "--client-id", str(k)])

    def wait_event(kind: str) -> dict[str, Any]:
        deadline = time.time() + 240
        while time.time() < deadline:
            metrics = run / "metrics.jsonl"
            found = [e for e in _events(metrics) if e["event"] == kind] if metrics.exists() else []
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"no {kind} event")

    server = start(["fl", "serve", str(config), "--listen", address, "--out", str(run)])
    clients = {k: client(k) for k in (1, 2, 3)}
    procs = [server, *clients.values()]
    try:
        wait_event("start")
        clients[2].kill()
        gone = wait_event("peer_gone")
        again = client(2)
        procs.append(again)
        joined = wait_event("client_joined")
        time.sleep(1.0)
        server.send_signal(signal.SIGINT)
        server_out, _ = server.communicate(timeout=60)
        outs = {k: c.communicate(timeout=60)[0] for k, c in ((1, clients[1]), (3, clients[3]))}
        again_out, _ = again.communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert gone["peer"] == 2 and (joined["peer"], joined["incarnation"]) == (2, 1)
    assert server.returncode == 130, server_out
    assert "interrupted" in server_out.strip().splitlines()[-1]
    # The new client 2 trained in the running job; every client ended on the stop flag.
    ends = {k: re.search(r"done \(stop\): (\d+) local steps", o) for k, o in outs.items()}
    ends[2] = re.search(r"done \(stop\): (\d+) local steps", again_out)
    assert again.returncode == 0 and all(ends.values()), (outs, again_out)
    assert int(ends[2].group(1)) > 0  # type: ignore[union-attr]
    s = json.loads((run / "summary.json").read_text())
    assert s["stop_reason"] == "interrupted"
    assert [(j["rank"], j["incarnation"]) for j in s["joins"]] == [(2, 1)]
    assert [(d["rank"], d["incarnation"]) for d in s["departures"]] == [(2, 0)]
    meta = json.loads(sorted((run / "checkpoint").glob("*/meta.json"))[-1].read_text())["state"]
    assert meta["version"] == s["iterations"] and meta["departures"] == s["departures"]


# ----------------------------------------------------------------------------- separate hosts


@pytest.fixture
def hosts() -> Iterator[netns.Plan]:
    """Four namespaces on one bridge (a server host and three client hosts); always torn
    down, and checked to be gone."""
    cfg = small_config(
        sites=[{"name": "a", "intra_bandwidth_mbps": 1000}],
        workers=[{"site": "a", "capacity_gflops": 1.0, "count": 4}],
        engine={"time_scale": 1.0},
    )
    with cluster_up(cfg, "fl") as plan:
        yield plan


@needs_netns
def test_server_and_clients_on_separate_hosts(hosts: netns.Plan, tmp_path: Path) -> None:
    """`dlion fl serve` in one namespace, `dlion fl client` in three others, over the
    bridge: an impostor with a wrong secret is refused (exit 2) and its id taken over by
    the real client; a second process for a taken id is refused (exit 2); the job reaches
    its target and every process ends when the server stops the run."""
    # Long enough for the duplicate to start (importing torch) while the job runs.
    cfg = with_fl_changes(_cfg(), ["train.max_time=25", "train.stop_at_target=false"])
    config = tmp_path / "fl.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    address = f"{hosts.workers[0].address}:29517"
    base = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": netns.WORKER_IFNAME}
    env = {**base, "DLION_SECRET": "s3cret"}

    def on(host: int, argv: list[str], environ: dict[str, str]) -> subprocess.Popen[str]:
        cmd = ["ip", "netns", "exec", hosts.workers[host].netns, *DLION, *argv]
        return subprocess.Popen(
            cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def client(host: int, k: int, environ: dict[str, str]) -> subprocess.Popen[str]:
        return on(
            host, ["fl", "client", str(config), "--server", address, "--client-id", str(k)], environ
        )

    run = tmp_path / "run"
    started = time.time()
    server = on(0, ["fl", "serve", str(config), "--listen", address, "--out", str(run)], env)
    procs = [server]
    try:
        impostor = client(1, 1, {**base, "DLION_SECRET": "guess"})
        procs.append(impostor)
        out, _ = impostor.communicate(timeout=180)
        assert impostor.returncode == 2, out
        assert out.strip().splitlines()[-1] == (
            "error: client 1: refused by the server: shared secret mismatch "
            "(engine.secret or DLION_SECRET)"
        )
        real = [client(1 + (k - 1) % 3, k, env) for k in (1, 2, 3)]
        procs += real
        deadline = time.time() + 180
        metrics = run / "metrics.jsonl"
        while time.time() < deadline and not (
            metrics.exists() and any(e["event"] == "start" for e in _events(metrics))
        ):
            time.sleep(0.2)
        twin = client(3, 2, env)
        procs.append(twin)
        twin_out, _ = twin.communicate(timeout=180)
        server_out, _ = server.communicate(timeout=240)
        outs = [c.communicate(timeout=60)[0] for c in real]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.time() - started
    assert server.returncode == 0, server_out
    assert [c.returncode for c in real] == [0, 0, 0], outs
    assert all("done (stop)" in o.strip().splitlines()[-1] for o in outs), outs
    assert twin.returncode == 2 and "--client-id 2: taken by another client process" in twin_out
    s = json.loads((run / "summary.json").read_text())
    assert s["tta_s"] is not None and s["final_acc"] >= cfg.train.target_acc
    assert s["stop_reason"] == "max_time" and s["time_s"] >= 25
    assert [r["rank"] for r in s["refused"]] == [1]
    # Client 1 took part: at the start (a new incarnation over the refused one) or joining.
    start = next(e for e in _events(run / "metrics.jsonl") if e["event"] == "start")
    assert 1 in start["linked"] or [j["rank"] for j in s["joins"]] == [1]
    assert s["server"]["merged"] > 0 and s["rejected_messages"] == 0
    assert wall < 300
