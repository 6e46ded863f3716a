"""`dlion netns`: the address plan and tc commands (pure, everywhere), and, as root with
`ip` and `tc`, real namespaces: shaped throughput per destination, a dist job over
kernel-shaped links, and a teardown that leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dlion.cli.commands import main
from dlion.cluster.topology import MBPS, Cluster
from dlion.core.config import ExperimentConfig, config_from_dict
from dlion.engines import netns
from dlion.engines.launcher import run_dist
from helpers import small_config
from netns_fixtures import cluster_up, free_subnet, leftovers, needs_netns


def three_workers(time_scale: float = 1.0, nic_mbps: float | None = None) -> ExperimentConfig:
    """Two workers in site a (40 Mbit/s between them), one in site b (16 Mbit/s to a)."""
    nic = {} if nic_mbps is None else {"nic_mbps": nic_mbps}
    return small_config(
        sites=[{"name": "a", "intra_bandwidth_mbps": 40}, {"name": "b"}],
        workers=[
            {"site": "a", "capacity_gflops": 0.02, "count": 2, **nic},
            {"site": "b", "capacity_gflops": 0.02, "count": 1, **nic},
        ],
        links=[{"sites": ["a", "b"], "bandwidth_mbps": 16, "latency_ms": 2}],
        train={"target_acc": 0.93, "max_time": 30.0},
        evaluation={"every_s": 0.25},
        engine={
            "name": "dist",
            "shaping": "kernel",
            "time_scale": time_scale,
            "peer_timeout": 5.0,
            "heartbeat_s": 0.2,
        },
    )


def plan_of(cfg: ExperimentConfig, prefix: str = "tp", subnet: str = "10.77.0.0/24") -> netns.Plan:
    return netns.plan_for(cfg, prefix, subnet)


# ----------------------------------------------------------------------------- pure parts


def test_address_plan_names_every_worker_and_puts_the_store_on_the_hub() -> None:
    plan = plan_of(three_workers(), "tp", "10.77.5.0/24")
    assert [w.netns for w in plan.workers] == ["tp-0", "tp-1", "tp-2"]
    assert [w.host_ifname for w in plan.workers] == ["tp-h0", "tp-h1", "tp-h2"]
    assert [w.address for w in plan.workers] == ["10.77.5.1", "10.77.5.2", "10.77.5.3"]
    assert plan.bridge == "tp-br" and plan.hub == "10.77.5.254" and plan.prefixlen == 24
    # One router per site, in order of first worker, each with its port on the core bridge.
    assert [(r.site, r.netns, r.host_ifname) for r in plan.routers] == [
        ("a", "tp-s0", "tp-u0"),
        ("b", "tp-s1", "tp-u1"),
    ]
    assert [w.site for w in plan.workers] == ["a", "a", "b"]
    # Every interface name fits the kernel's 15 characters, even with the longest prefix.
    long = plan_of(three_workers(), "abcdefgh")
    names = [n for w in long.workers for n in (w.host_ifname, w.netns)]
    names += [n for r in long.routers for n in (r.host_ifname, r.netns)]
    assert all(len(n) <= 15 for n in names)


def test_rates_are_per_destination_and_scaled_by_the_time_scale() -> None:
    plan = plan_of(three_workers(time_scale=2.0))
    w0 = plan.workers[0]
    rates = {c.peer: (c.rate_bps, c.ceil_bps, c.dst, c.parent, c.via) for c in w0.classes}
    # 40 Mbit/s inside site a, halved by time_scale 2; site b is behind the routers' pipe.
    unshaped = netns.UNSHAPED_BPS
    assert rates == {
        1: (20_000_000, 20_000_000, "10.77.0.2", "1:", None),
        2: (unshaped, unshaped, "10.77.0.3", "1:", "b"),
    }
    # The pipe a -> b (16 Mbit/s, halved) is one class on site a's router, for every
    # worker of b; and b -> a on b's router.
    pipes = {
        r.site: [(c.site, c.dsts, c.rate_bps, c.ceil_bps) for c in r.pipes] for r in plan.routers
    }
    assert pipes == {
        "a": [("b", ("10.77.0.3",), 8_000_000, 8_000_000)],
        "b": [("a", ("10.77.0.1", "10.77.0.2"), 8_000_000, 8_000_000)],
    }
    cluster = Cluster.from_config(three_workers().cluster)
    assert cluster.link(0, 2).bandwidth == 16 * MBPS
    assert {c.via for c in plan.workers[2].classes} == {"a"}


def test_a_nic_is_a_parent_class_shared_by_the_peer_classes() -> None:
    plan = plan_of(three_workers(nic_mbps=30))
    w0 = plan.workers[0]
    assert w0.nic_bps == 30_000_000
    by_peer = {c.peer: c for c in w0.classes}
    assert all(c.parent == "1:1" for c in w0.classes)
    # Guaranteed shares add up to the NIC; each may borrow up to min(link, NIC).
    assert by_peer[1].rate_bps == 15_000_000 and by_peer[1].ceil_bps == 30_000_000
    # The peer behind the pipe may use the whole NIC here; the router caps it at 16.
    assert by_peer[2].rate_bps == 15_000_000 and by_peer[2].ceil_bps == 30_000_000
    assert sum(c.rate_bps for c in w0.classes) <= w0.nic_bps


def test_tc_commands_shape_each_peer_by_destination_address() -> None:
    plan = plan_of(three_workers(nic_mbps=30))
    cmds = netns.tc_commands(plan.workers[0])
    assert all(c[:3] == ["tc", "-n", "tp-0"] for c in cmds)
    root = cmds[0]
    assert root[3:] == [
        "qdisc",
        "add",
        "dev",
        "eth0",
        "root",
        "handle",
        "1:",
        "htb",
        "default",
        "2",
    ]
    classes = {c[c.index("classid") + 1]: c for c in cmds if c[3] == "class"}
    assert set(classes) == {"1:2", "1:1", "1:101", "1:102"}
    assert classes["1:1"][classes["1:1"].index("rate") + 1] == "30000000bit"
    slow = classes["1:102"]
    assert slow[slow.index("parent") + 1] == "1:1"
    assert slow[slow.index("ceil") + 1] == "30000000bit"
    filters = [c for c in cmds if c[3] == "filter"]
    assert [(f[f.index("dst") + 1], f[f.index("flowid") + 1]) for f in filters] == [
        ("10.77.0.2/32", "1:101"),
        ("10.77.0.3/32", "1:102"),
    ]
    # Without NICs the peer classes hang from the root and there is no 1:1.
    flat = plan_of(three_workers())
    assert not any("1:1" in c for c in netns.tc_commands(flat.workers[0]))


def _filters(cmds: list[list[str]]) -> list[tuple[str | None, str | None, str, str]]:
    """(src, dst, prio, flowid) of each u32 filter."""

    def after(c: list[str], word: str) -> str | None:
        return c[c.index(word) + 1].removesuffix("/32") if word in c else None

    return [
        (after(c, "src"), after(c, "dst"), c[c.index("prio") + 1], c[c.index("flowid") + 1])
        for c in cmds
        if "filter" in c[:4]
    ]


def test_router_shapes_one_pipe_per_destination_site_under_its_uplink() -> None:
    """Sites a (ranks 0, 1; uplink 12), b (2), c (3; downlink 6); pipes a-b 16, a-c 8,
    b-c default 100 Mbit/s; a per-pair link 1 <-> 3 bypasses the pipes."""
    cfg = small_config(
        sites=[{"name": "a", "uplink_mbps": 12}, {"name": "b"}, {"name": "c", "downlink_mbps": 6}],
        workers=[
            {"site": "a", "capacity_gflops": 0.02, "count": 2},
            {"site": "b", "capacity_gflops": 0.02},
            {"site": "c", "capacity_gflops": 0.02},
        ],
        links=[
            {"sites": ["a", "b"], "bandwidth_mbps": 16, "latency_ms": 2},
            {"sites": ["a", "c"], "bandwidth_mbps": 8, "latency_ms": 2},
            {"workers": [1, 3], "bandwidth_mbps": 4, "latency_ms": 1},
        ],
    )
    plan = plan_of(cfg)
    a, b, c = plan.routers
    assert a.uplink_bps == 12_000_000 and c.downlink_bps == 6_000_000
    # Under the uplink each pipe is guaranteed half of it, and may borrow up to min(pipe, 12).
    assert [(p.site, p.parent, p.rate_bps, p.ceil_bps) for p in a.pipes] == [
        ("b", "1:1", 6_000_000, 12_000_000),
        ("c", "1:1", 6_000_000, 8_000_000),
    ]
    assert [(p.site, p.parent, p.rate_bps) for p in b.pipes] == [
        ("a", "1:", 16_000_000),
        ("c", "1:", 100_000_000),
    ]
    cmds = netns.router_tc_commands(a)
    assert all(cmd[:3] == ["tc", "-n", "tp-s0"] and "wan" in cmd for cmd in cmds)
    assert _filters(cmds) == [
        ("10.77.0.2", "10.77.0.4", "1", "1:2"),  # the per-pair link 1 -> 3: not on a pipe
        ("10.77.0.4", "10.77.0.2", "1", "1:2"),
        (None, "10.77.0.3", "2", "1:100"),  # site b
        (None, "10.77.0.4", "2", "1:101"),  # site c
    ]
    # The per-pair link is shaped on the workers, like a link inside a site.
    assert {k.peer: (k.via, k.rate_bps) for k in plan.workers[1].classes}[3] == (None, 4_000_000)
    # c's downlink: on the core's port to c (root namespace), traffic from the others' workers.
    down = netns.downlink_tc_commands(c)
    assert all(cmd[0] == "tc" and "-n" not in cmd for cmd in down)
    assert all(cmd[cmd.index("dev") + 1] == "tp-u2" for cmd in down)
    assert _filters(down)[2:] == [
        ("10.77.0.1", None, "2", "1:1"),
        ("10.77.0.2", None, "2", "1:1"),
        ("10.77.0.3", None, "2", "1:1"),
    ]
    assert netns.downlink_tc_commands(a) == []


def test_plan_round_trips_through_json_and_matches_only_the_same_config() -> None:
    plan = plan_of(three_workers())
    again = netns.Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan
    assert plan_of(three_workers(), "other", "10.9.9.0/24").links() == plan.links()
    assert plan_of(three_workers(time_scale=2.0)).links() != plan.links()


@pytest.mark.parametrize(
    ("prefix", "subnet", "needle"),
    [
        ("Bad!", "10.77.0.0/24", "--prefix"),
        ("waytoolongname", "10.77.0.0/24", "--prefix"),
        ("tp", "10.77.0.0/30", "has 2 host addresses"),
        ("tp", "fd00::/64", "not IPv4"),
        ("tp", "10.77.0.0/33", "--subnet"),
    ],
)
def test_bad_prefix_or_subnet_is_a_clear_error(prefix: str, subnet: str, needle: str) -> None:
    with pytest.raises(netns.NetnsError, match="^.*" + needle.replace("-", "\\-")):
        plan_of(three_workers(), prefix, subnet)


def test_parse_class_bytes_reads_tc_statistics() -> None:
    text = (
        "class htb 1:101 parent 1:1 prio 0 rate 50Mbit ceil 250Mbit burst 1600b cburst 1562b \n"
        " Sent 2930000 bytes 2000 pkt (dropped 0, overlimits 0 requeues 0) \n"
        " backlog 0b 0p requeues 0\n\n"
        "class htb 1:2 root prio 0 rate 10Gbit ceil 10Gbit burst 202500b cburst 202500b \n"
        " Sent 516 bytes 6 pkt (dropped 0, overlimits 0 requeues 0) \n"
    )
    assert netns.parse_class_bytes(text) == {0x101: 2_930_000, 2: 516}


def test_attach_refuses_double_shaping_and_a_prefix_that_is_not_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(netns.STATE_DIR_ENV, str(tmp_path))
    cfg = three_workers()
    transport = cfg.model_copy(
        update={"engine": cfg.engine.model_copy(update={"shaping": "transport"})}
    )
    with pytest.raises(netns.NetnsError, match="shape every link twice"):
        netns.attach(transport, "tp")
    monkeypatch.setattr(netns, "check_host", lambda: None)
    with pytest.raises(netns.NetnsError, match="'tp' is not up"):
        netns.attach(cfg, "tp")
    # A state recorded for another time scale does not fit this config.
    other = plan_of(three_workers(time_scale=4.0))
    state = {"version": 2, "status": "up", "plan": other.to_json(), "created": []}
    (tmp_path / "tp.json").write_text(json.dumps(state))
    with pytest.raises(netns.NetnsError, match="another cluster or time scale"):
        netns.attach(cfg, "tp")
    monkeypatch.setattr(netns, "existing_namespaces", lambda: {"tp-0", "tp-1", "tp-s0", "tp-s1"})
    (tmp_path / "tp.json").write_text(json.dumps({**state, "plan": plan_of(cfg).to_json()}))
    with pytest.raises(netns.NetnsError, match="tp-2 is gone"):
        netns.attach(cfg, "tp")
    monkeypatch.setattr(
        netns, "existing_namespaces", lambda: {"tp-0", "tp-1", "tp-2", "tp-s0", "tp-s1"}
    )
    att = netns.attach(cfg, "tp")
    assert att.store_host == "10.77.0.254"
    assert att.command(2, ["python"]) == ["ip", "netns", "exec", "tp-2", "python"]
    assert att.env(1) == {"GLOO_SOCKET_IFNAME": "eth0"}


def test_down_of_a_prefix_that_is_not_up_is_a_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(netns.STATE_DIR_ENV, str(tmp_path))
    assert netns.down("tp") == []
    assert netns.down("tp") == []


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_cli_status_down_and_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(netns.STATE_DIR_ENV, str(tmp_path))
    assert main(["netns", "status"]) == 0
    assert "no dlion namespaces are up" in capsys.readouterr().out
    assert main(["netns", "down", "--prefix", "tp"]) == 0
    assert "tp: nothing to remove" in capsys.readouterr().out
    assert main(["netns", "up", "homogeneous", "--prefix", "Bad!"]) == 2
    assert "--prefix" in _one_error_line(capsys)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["netns", "up", "homogeneous", "--prefix", "tp"]) == 2
    assert "needs root" in _one_error_line(capsys)
    assert main(["train", "homogeneous", "--engine", "sim", "--netns", "tp"]) == 2
    assert "only for the dist engine" in _one_error_line(capsys)
    assert not list(tmp_path.iterdir())  # nothing recorded by the refused `up`


# ----------------------------------------------------------------------------- as root


@pytest.fixture(scope="module")
def shaped() -> Iterator[tuple[netns.Plan, ExperimentConfig]]:
    """The three-worker cluster up in namespaces; always torn down, and checked to be gone."""
    cfg = three_workers()
    with cluster_up(cfg, "dt") as plan:
        yield plan, cfg


_SERVER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
n, t0, t1 = 0, None, None
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    t1 = time.perf_counter()
    t0 = t0 or t1
    n += len(b)
print(n, t1 - t0, flush=True)
"""

_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
c.sendall(b"x" * int(sys.argv[3]))
c.close()
"""


def _goodput_bps(plan: netns.Plan, src: int, dst: int, nbytes: int, port: int) -> float:
    """Payload bits per second from worker src to worker dst, measured by the receiver."""
    addr = plan.workers[dst].address
    exe = ["ip", "netns", "exec"]
    client = [sys.executable, "-c", _CLIENT, addr, str(port), str(nbytes)]
    server = subprocess.Popen(
        [*exe, plan.workers[dst].netns, sys.executable, "-c", _SERVER, addr, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        subprocess.run(
            [*exe, plan.workers[src].netns, *client],
            check=True,
            timeout=60,
        )
        out, _ = server.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
    got, seconds = out.split()
    assert int(got) == nbytes
    return nbytes * 8 / float(seconds)


@needs_netns
def test_throughput_between_namespaces_follows_each_link(
    shaped: tuple[netns.Plan, ExperimentConfig],
) -> None:
    plan, _ = shaped
    # From worker 0: 40 Mbit/s to its site-mate, 16 Mbit/s to the other site (~2 s each).
    fast = _goodput_bps(plan, 0, 1, 10_000_000, 7301)
    slow = _goodput_bps(plan, 0, 2, 4_000_000, 7302)
    back = _goodput_bps(plan, 2, 0, 4_000_000, 7303)
    assert fast == pytest.approx(40e6, rel=0.25), fast
    assert slow == pytest.approx(16e6, rel=0.25), slow
    assert back == pytest.approx(16e6, rel=0.25), back
    sent = netns.peer_bytes(plan, 0)
    assert sent[1] >= 10_000_000 and sent[2] >= 4_000_000  # through the shaped classes


# As _SERVER, but reports when the first and last bytes came, on the host's clock.
_SERVER_TIMES = _SERVER.replace("time.perf_counter()", "time.time()").replace(
    "print(n, t1 - t0, flush=True)", "print(n, t0, t1, flush=True)"
)


def _concurrent_goodput_bps(
    plan: netns.Plan, flows: list[tuple[int, int]], nbytes: int, port: int
) -> float:
    """Payload bits per second of (src, dst) flows started at once, together: all their
    bytes over the time from the first byte of any to the last byte of all."""
    exe = ["ip", "netns", "exec"]
    servers, clients = [], []
    try:
        for i, (_, dst) in enumerate(flows):
            addr = plan.workers[dst].address
            server = subprocess.Popen(
                [
                    *exe,
                    plan.workers[dst].netns,
                    sys.executable,
                    "-c",
                    _SERVER_TIMES,
                    addr,
                    str(port + i),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            servers.append(server)
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        for i, (src, dst) in enumerate(flows):
            addr = plan.workers[dst].address
            client = [sys.executable, "-c", _CLIENT, addr, str(port + i), str(nbytes)]
            clients.append(subprocess.Popen([*exe, plan.workers[src].netns, *client]))
        for c in clients:
            assert c.wait(timeout=60) == 0
        outs = [server.communicate(timeout=60)[0] for server in servers]
    finally:
        for proc in servers + clients:
            proc.kill()
            proc.wait()
    spans = []
    for out in outs:
        got, t0, t1 = out.split()
        assert int(got) == nbytes
        spans.append((float(t0), float(t1)))
    first, last = min(t0 for t0, _ in spans), max(t1 for _, t1 in spans)
    return len(flows) * nbytes * 8 / (last - first)


@needs_netns
def test_the_workers_of_a_site_share_its_pipe_to_another_site(
    shaped: tuple[netns.Plan, ExperimentConfig],
) -> None:
    """Workers 0 and 1 (site a) send to worker 2 (site b) at once: the 16 Mbit/s pipe a -> b
    on a's router carries both, so together they move 16 Mbit/s (8 each while both run,
    the sim's max-min share), not 16 each as with one class per worker pair."""
    plan, _ = shaped
    before = netns.pipe_bytes(plan, "a")["b"]
    together = _concurrent_goodput_bps(plan, [(0, 2), (1, 2)], 3_000_000, 7311)
    assert together == pytest.approx(16e6, rel=0.25), together
    assert netns.pipe_bytes(plan, "a")["b"] - before >= 6_000_000


@needs_netns
def test_dist_job_trains_over_kernel_shaped_links(
    shaped: tuple[netns.Plan, ExperimentConfig], tmp_path: Path
) -> None:
    plan, cfg = shaped
    before = {r: netns.peer_bytes(plan, r) for r in range(3)}
    started = time.time()
    result = run_dist(cfg, out_dir=tmp_path, progress=False, netns=plan.prefix)
    s: dict[str, Any] = result.summary
    assert s["netns"] == plan.prefix and s["shaping"] == "kernel"
    assert s["tta_s"] is not None and s["final_acc"] >= cfg.train.target_acc
    assert s["membership"] == []
    # The training traffic crossed the veths through the per-peer classes, both ways.
    after = {r: netns.peer_bytes(plan, r) for r in range(3)}
    for r in range(3):
        for peer in after[r]:
            assert after[r][peer] > before[r][peer], (r, peer)
    assert time.time() - started < 120


@needs_netns
def test_all_reduce_on_kernel_shaped_pipes_is_the_ring_and_pays_bytes_and_latency(
    shaped: tuple[netns.Plan, ExperimentConfig], tmp_path: Path
) -> None:
    """The all-reduce strategy on the same namespaces, compute far faster than the links
    and a 20 ms latency on the pipe (the transport adds latency; the plan has only rates):
    the ring's chunks cross the routers' 16 Mbit/s pipe a -> b (rank 1 -> 2) and pay the
    pipe's latency at least twice per iteration. The native collective did neither
    (RESULTS.md section 12e)."""
    from dlion.comm.collectives import ring_bytes
    from dlion.training.experiment import make_replica, prepare

    plan, _ = shaped
    base = three_workers()
    raw = base.model_dump(mode="json")
    raw["strategy"] = {"name": "allreduce", "options": {}}
    for w in raw["cluster"]["workers"]:
        w["capacity_gflops"] = 1000.0
    raw["cluster"]["links"][0]["latency_ms"] = 20
    raw["train"].update({"stop_at_target": False, "max_time": 3.0})
    cfg = config_from_dict(raw)
    before = netns.pipe_bytes(plan, "a")["b"]
    s: dict[str, Any] = run_dist(cfg, out_dir=tmp_path, progress=False, netns=plan.prefix).summary
    crossed = netns.pipe_bytes(plan, "a")["b"] - before
    iterations = s["iterations"]
    numel = make_replica(cfg, prepare(cfg, 3), 0).numel
    assert iterations >= 5
    assert crossed >= iterations * ring_bytes(numel, 3, 1)
    assert s["time_s"] >= iterations * 2 * 0.020, (s["time_s"], iterations)
    assert s["time_s"] >= iterations * ring_bytes(numel, 3, 1) / 2e6
    events = [json.loads(line) for line in (tmp_path / "workers" / "rank-0.jsonl").open()]
    assert not [e for e in events if e["event"] == "collective_group"]  # no native group


@needs_netns
def test_on_kernel_shaped_links_a_send_ends_when_its_bytes_left_and_arrives_a_latency_later(
    shaped: tuple[netns.Plan, ExperimentConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 300 ms latency on the pipe a - b (the plan has only rates; the dist engine adds
    latency): worker 0's 20 kB send to worker 2 ends once its bytes have left (10 ms at
    16 Mbit/s), as in the sim, and worker 2 gets it at least 300 ms after it was sent.
    The latency used to be held at the sender, so the send itself took the 300 ms too."""
    tests = Path(__file__).parent
    monkeypatch.setenv("DLION_PLUGINS", "dist_plugins")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])
    )
    import dist_plugins  # noqa: F401  (registers t-latency here too, for config validation)

    plan, _ = shaped
    raw = three_workers().model_dump(mode="json")
    raw["strategy"] = {"name": "t-latency", "options": {}}
    raw["cluster"]["links"][0]["latency_ms"] = 300
    raw["train"].update({"stop_at_target": False, "max_time": 2.0})
    cfg = config_from_dict(raw)
    run_dist(cfg, out_dir=tmp_path, progress=False, netns=plan.prefix)

    def events(rank: int, name: str) -> list[dict[str, Any]]:
        path = tmp_path / "workers" / f"rank-{rank}.jsonl"
        return [e for e in map(json.loads, path.open()) if e["event"] == name]

    [sent] = events(0, "sent")
    [delivered] = events(2, "delivered")
    assert sent["seconds"] < 0.2, sent
    assert delivered["after"] >= 0.3, delivered


@needs_netns
def test_up_refuses_names_taken_and_down_is_exact_and_idempotent(
    shaped: tuple[netns.Plan, ExperimentConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    plan, cfg = shaped
    with pytest.raises(netns.NetnsError, match="already up"):
        netns.up(plan)
    # Another prefix over the same subnet is refused before anything is made.
    other = f"do{os.getpid() % 1_000_000}"
    with pytest.raises(netns.NetnsError, match="overlaps"):
        netns.up(plan_of(cfg, other, plan.subnet))
    assert leftovers(other) == [] and netns.read_state(other) is None
    # A second, separate prefix via the CLI: up, status, down twice.
    assert main(["netns", "up", "homogeneous", "--prefix", other, "--subnet", free_subnet()]) == 0
    # 6 worker namespaces, 1 router namespace, its port on the core bridge, the bridge.
    assert netns.read_state(other) is not None and len(leftovers(other)) == 6 + 1 + 1 + 1
    assert main(["netns", "status", "--prefix", other]) == 0
    assert f"{other}-5" in capsys.readouterr().out
    assert main(["netns", "down", "--prefix", other]) == 0
    assert main(["netns", "down", "--prefix", other]) == 0
    assert "nothing to remove" in capsys.readouterr().out.splitlines()[-1]
    assert leftovers(other) == [] and netns.read_state(other) is None
