"""Several hosts, really separate: the README's torchrun multi-host command, run verbatim on
two "hosts" that are network namespaces (own address, own kernel-shaped links), and the
rule that makes it work anywhere: gloo listens on the address that reaches the store, not
on whatever the host name resolves to."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from dlion.comm.transport import gloo_bind_address, reachable_address, store_host
from dlion.core.config import ExperimentConfig, load_config
from dlion.engines import netns
from helpers import small_config
from netns_fixtures import cluster_up, needs_netns

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_multihost_command() -> list[str]:
    """The torchrun command of the README's "Several machines" paragraph, as argv."""
    text = README.read_text()
    section = text[text.index("**Several machines.**") :]
    block = section[section.index("```") + 3 :]
    block = block[: block.index("```")]
    return shlex.split(block.replace("\\\n", " "))


def test_readme_command_names_node_rank_and_master_address() -> None:
    argv = readme_multihost_command()
    assert argv[:2] == ["torchrun", "--nnodes"]
    for flag in ("--node-rank", "--master-addr", "--master-port", "--out"):
        assert flag in argv, argv
    assert argv[argv.index("-m") + 1] == "dlion.jobs.dist_worker"


def test_gloo_listens_where_the_store_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    wrapped = dist.PrefixStore("b/", dist.PrefixStore("a/", store))
    assert store_host(wrapped) == "127.0.0.1"
    assert reachable_address("127.0.0.1") == "127.0.0.1"
    assert gloo_bind_address(wrapped) == "127.0.0.1"
    # An interface named by the user wins: gloo's own default reads it.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert gloo_bind_address(wrapped) is None


def two_hosts() -> ExperimentConfig:
    """Two hosts in two sites, one worker each, a 20 Mbit/s pipe between them."""
    return small_config(
        sites=[{"name": "a"}, {"name": "b"}],
        workers=[
            {"site": "a", "capacity_gflops": 0.02},
            {"site": "b", "capacity_gflops": 0.02},
        ],
        links=[{"sites": ["a", "b"], "bandwidth_mbps": 20, "latency_ms": 2}],
        train={"target_acc": 0.9, "max_time": 30.0},
        evaluation={"every_s": 0.5},
        engine={"name": "dist", "shaping": "kernel", "peer_timeout": 5.0, "heartbeat_s": 0.2},
    )


def _on_host(plan: netns.Plan, rank: int, argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    """`argv` started on "host" `rank`: inside its namespace, torchrun from this venv."""
    argv = [str(Path(sys.executable).with_name(argv[0])), *argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    return subprocess.Popen(
        ["ip", "netns", "exec", plan.workers[rank].netns, *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(procs: list[subprocess.Popen[str]], timeout_s: float) -> list[str]:
    try:
        return [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _run_on_hosts(
    plan: netns.Plan, argv: list[str], cwd: Path, timeout_s: float
) -> tuple[list[int], list[str]]:
    """The README's multi-host command on every host (node rank R on host R, HOST0 = host
    0's address), as it says to do in namespaces."""
    host0 = plan.workers[0].address  # exists only inside namespace PREFIX-0
    procs = []
    for r in range(len(plan.workers)):
        on_r = [host0 if a == "HOST0" else a for a in argv]
        on_r[on_r.index("--node-rank") + 1] = str(r)
        procs.append(_on_host(plan, r, on_r, cwd))
    outputs = _finish(procs, timeout_s)
    return [p.returncode for p in procs], outputs


@pytest.mark.slow
@needs_netns
def test_readme_multihost_command_runs_with_each_host_in_its_own_namespace(
    tmp_path: Path,
) -> None:
    cfg = two_hosts()
    (tmp_path / "my-cluster.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # As the README says for namespaces.
    argv = [*readme_multihost_command(), "--set", "engine.shaping=kernel"]
    with cluster_up(cfg, "dh") as plan:
        codes, outputs = _run_on_hosts(plan, argv, tmp_path, 150)
        pipes = {r.site: netns.pipe_bytes(plan, r.site) for r in plan.routers}
    for r, (code, out) in enumerate(zip(codes, outputs, strict=True)):
        assert code == 0, f"host {r}:\n{out[-3000:]}"
    run = tmp_path / "runs" / "multi"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tta_s"] is not None and summary["final_acc"] >= cfg.train.target_acc
    assert (run / "workers" / "rank-1.jsonl").is_file()
    assert re.search(r"time to 90\.00%", outputs[0]), outputs[0][-2000:]
    # The training traffic crossed the routers' shaped pipes, both ways.
    assert pipes["a"]["b"] > 100_000 and pipes["b"]["a"] > 100_000, pipes


@pytest.mark.slow
@needs_netns
def test_probe_across_torchrun_hosts_measures_the_tc_rates(tmp_path: Path) -> None:
    """`-m dlion probe` in place of `-m dlion.jobs.dist_worker` in the README's command: each host
    times its own steps, the links are measured between the hosts; host 0 writes the
    config, one worker entry per rank."""
    cfg = two_hosts()
    (tmp_path / "my-cluster.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    argv = readme_multihost_command()
    i = argv.index("dlion.jobs.dist_worker")
    argv[i : i + 1] = ["dlion", "probe"]
    argv[argv.index("--out") + 1] = "probed.yaml"
    argv += ["--repeats", "5", "--mb-per-pair", "1.5"]
    with cluster_up(cfg, "dp") as plan:
        codes, outputs = _run_on_hosts(plan, argv, tmp_path, 150)
    for r, (code, out) in enumerate(zip(codes, outputs, strict=True)):
        assert code == 0, f"host {r}:\n{out[-3000:]}"
    probed = load_config(str(tmp_path / "probed.yaml"))
    assert [(w.site, w.count) for w in probed.cluster.workers] == [("a", 1), ("b", 1)]
    assert all(w.capacity_gflops > 0 for w in probed.cluster.workers)
    (link,) = probed.cluster.links
    # tc: a 20 Mbit/s pipe each way between the two hosts' sites.
    assert tuple(link.sites or ()) == ("a", "b")
    assert link.bandwidth_mbps == pytest.approx(20, rel=0.10), outputs[0][-2000:]
