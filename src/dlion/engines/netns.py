"""Kernel-shaped links for the dist engine: one network namespace per worker.

`up(cfg, prefix)` builds, for a scenario's N workers:

- namespaces PREFIX-0 .. PREFIX-(N-1), each with `lo` up and one veth end named `eth0`
  holding the worker's address on a private subnet (default 10.77.0.0/24: workers .1 ..
  .N);
- a bridge PREFIX-br in the root namespace with the other veth ends (PREFIX-h0 ...)
  attached; the bridge holds the hub address (the subnet's last host, .254), where the
  launcher, which stays in the root namespace, hosts the job's store;
- on each worker's `eth0`, egress shaping with tc: an htb qdisc with one class per peer at
  that link's rate (bytes/s / engine.time_scale, as the transport shaper scales it) and a
  u32 filter on the peer's address, so unequal inter-site links are real, per
  destination. Where the worker has a NIC rate, the peer classes hang under one class at
  the NIC rate (each guaranteed an equal share, each allowed up to its link's rate), so
  transfers to several peers share the NIC as they do in the sim and the transport
  shaper. Traffic to the hub (the store: registration, heartbeats, snapshots) goes to an
  unshaped default class: it is not training traffic, and the transport shaper does not
  charge it either.

Rates are line rates: packet headers count against them, so TCP payload goodput is a few
percent below the configured rate (about 95% for full-size frames), as on a real link.
netem is not available here, so latency stays in the transport (engine.shaping=kernel
adds each link's latency before sending and leaves the bandwidth to tc). Bandwidth traces
(`dynamics.bandwidth`) are not followed: the classes keep the scenario's base rates.

What `up` creates is recorded, before each step, in a JSON state file
(/run/dlion/netns/PREFIX.json, or $DLION_NETNS_DIR), so `down(prefix)` removes exactly
that, also after a failed or interrupted `up`, and is idempotent. Deleting a namespace
removes its veth pair and its qdiscs with it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dlion.cluster import Cluster
from dlion.config import ExperimentConfig
from dlion.errors import BadInput, DlionError

DEFAULT_PREFIX = "dlion"
DEFAULT_SUBNET = "10.77.0.0/24"
STATE_DIR_ENV = "DLION_NETNS_DIR"
DEFAULT_STATE_DIR = Path("/run/dlion/netns")
WORKER_IFNAME = "eth0"  # the worker's end of its veth, inside its namespace
# Traffic not addressed to a peer (the store on the hub) is not shaped; htb needs a rate,
# so it gets one no veth on a small host reaches, and a burst (htb's default rounds to 0
# bytes at this rate).
UNSHAPED_BPS = 10_000_000_000
UNSHAPED_BURST = "200k"
# htb's DRR quantum is rate / r2q (r2q = 10) by default; kept inside the range htb
# recommends (one full frame .. 200 kB), which also silences its warnings at high rates.
_QUANTUM_MIN, _QUANTUM_MAX = 1514, 200_000
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_STATE_VERSION = 1


class NetnsError(BadInput):
    """Bad input or an unusable host for namespaces (exit 2): not root, no `ip`, names taken."""


class NetnsFailure(DlionError):
    """A command failed part-way through `up` (after the checks); what it made is removed."""


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PeerClass:
    """One htb class on a worker's eth0: traffic to `peer` at `rate_bps`, up to `ceil_bps`."""

    peer: int
    dst: str
    classid: str
    parent: str
    rate_bps: int  # bits per second, already divided by the time scale
    ceil_bps: int


@dataclass(frozen=True)
class WorkerNet:
    rank: int
    netns: str
    host_ifname: str  # the veth end on the bridge (root namespace)
    address: str
    nic_bps: int | None
    classes: tuple[PeerClass, ...]


@dataclass(frozen=True)
class Plan:
    prefix: str
    subnet: str
    bridge: str
    hub: str  # the bridge's address: where the job's store listens
    time_scale: float
    workers: tuple[WorkerNet, ...]

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def links(self) -> dict[str, Any]:
        """What shapes traffic, independent of names and addresses (to match a config)."""
        return {
            "time_scale": self.time_scale,
            "workers": [
                {
                    "nic_bps": w.nic_bps,
                    "classes": [[c.peer, c.rate_bps, c.ceil_bps] for c in w.classes],
                }
                for w in self.workers
            ],
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Plan:
        workers = tuple(
            WorkerNet(
                **{
                    **w,
                    "classes": tuple(PeerClass(**c) for c in w["classes"]),
                }
            )
            for w in raw["workers"]
        )
        return cls(**{**raw, "workers": workers})


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise NetnsError(
            f"--prefix: {prefix!r} must be 1-8 lowercase letters or digits, starting with a "
            "letter (it names namespaces and interfaces, which have a 15-character limit)"
        )
    return prefix


def _bps(bytes_per_s: float, time_scale: float) -> int:
    return max(1, round(bytes_per_s * 8 / time_scale))


def _quantum(rate_bps: int) -> int:
    return int(min(max(rate_bps / 8 / 10, _QUANTUM_MIN), _QUANTUM_MAX))


def make_plan(
    cluster: Cluster,
    *,
    time_scale: float,
    prefix: str = DEFAULT_PREFIX,
    subnet: str = DEFAULT_SUBNET,
) -> Plan:
    """Names, addresses and tc classes for `cluster`; pure (nothing is created)."""
    check_prefix(prefix)
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as err:
        raise NetnsError(f"--subnet: {err}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise NetnsError(f"--subnet: {subnet} is not IPv4 (tc's u32 filters here match IPv4)")
    hosts = list(net.hosts())
    if len(hosts) < cluster.size + 1:
        raise NetnsError(
            f"--subnet: {subnet} has {len(hosts)} host addresses; {cluster.size} workers and "
            "the hub need one each"
        )
    if cluster.size > 999:
        raise NetnsError(f"netns: {cluster.size} workers; at most 999 (interface names)")
    addresses = [str(h) for h in hosts[: cluster.size]]
    workers = []
    for w in cluster.workers:
        peers = [p for p in range(cluster.size) if p != w.rank]
        nic = None if w.nic_bytes_per_s is None else _bps(w.nic_bytes_per_s, time_scale)
        classes = []
        for p in peers:
            link = _bps(cluster.link(w.rank, p).bandwidth, time_scale)
            if nic is None:
                rate, ceil, parent = link, link, "1:"
            else:
                # Guaranteed shares add up to the NIC; each may borrow up to its link.
                rate = max(1, min(link, nic // len(peers)))
                ceil, parent = min(link, nic), "1:1"
            classes.append(PeerClass(p, addresses[p], f"1:{0x100 + p:x}", parent, rate, ceil))
        workers.append(
            WorkerNet(
                w.rank,
                f"{prefix}-{w.rank}",
                f"{prefix}-h{w.rank}",
                addresses[w.rank],
                nic,
                tuple(classes),
            )
        )
    return Plan(prefix, str(net), f"{prefix}-br", str(hosts[-1]), time_scale, tuple(workers))


def plan_for(cfg: ExperimentConfig, prefix: str, subnet: str = DEFAULT_SUBNET) -> Plan:
    return make_plan(
        Cluster.from_config(cfg.cluster),
        time_scale=cfg.engine.time_scale,
        prefix=prefix,
        subnet=subnet,
    )


def tc_commands(plan: Plan, w: WorkerNet) -> list[list[str]]:
    """The `tc` argv lists that shape worker `w`'s egress (run inside its namespace)."""
    dev = ["dev", WORKER_IFNAME]
    tc = ["tc", "-n", w.netns]
    cmds = [
        [*tc, "qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", "2"],
        [
            *tc, "class", "add", *dev, "parent", "1:", "classid", "1:2", "htb",
            "rate", f"{UNSHAPED_BPS}bit", "burst", UNSHAPED_BURST, "cburst", UNSHAPED_BURST,
            "quantum", str(_QUANTUM_MAX),
        ],
    ]  # fmt: skip
    if w.nic_bps is not None:
        cmds.append(
            [
                *tc, "class", "add", *dev, "parent", "1:", "classid", "1:1", "htb",
                "rate", f"{w.nic_bps}bit", "ceil", f"{w.nic_bps}bit",
                "quantum", str(_quantum(w.nic_bps)),
            ]
        )  # fmt: skip
    for c in w.classes:
        cmds.append(
            [
                *tc, "class", "add", *dev, "parent", c.parent, "classid", c.classid, "htb",
                "rate", f"{c.rate_bps}bit", "ceil", f"{c.ceil_bps}bit",
                "quantum", str(_quantum(c.rate_bps)),
            ]
        )  # fmt: skip
        cmds.append(
            [
                *tc, "filter", "add", *dev, "parent", "1:", "protocol", "ip", "prio", "1",
                "u32", "match", "ip", "dst", f"{c.dst}/32", "flowid", c.classid,
            ]
        )  # fmt: skip
    return cmds


# ----------------------------------------------------------------------------- state


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def state_path(prefix: str) -> Path:
    return state_dir() / f"{check_prefix(prefix)}.json"


def read_state(prefix: str) -> dict[str, Any] | None:
    path = state_path(prefix)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise NetnsError(f"{path}: unreadable netns state ({err}); remove it by hand") from None
    if not isinstance(raw, dict) or raw.get("version") != _STATE_VERSION:
        raise NetnsError(f"{path}: not a dlion netns state file (version {_STATE_VERSION})")
    return raw


def _write_state(prefix: str, state: dict[str, Any]) -> None:
    path = state_path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def load_plan(prefix: str) -> Plan:
    """The plan of a prefix that is up; a clear error if it is not (or only half) up."""
    state = read_state(prefix)
    if state is None:
        raise NetnsError(f"--netns: {prefix!r} is not up (run `dlion netns up SCENARIO` first)")
    if state.get("status") != "up":
        raise NetnsError(
            f"--netns: {prefix!r} is only partly set up (`dlion netns down --prefix {prefix}`)"
        )
    return Plan.from_json(state["plan"])


def list_prefixes() -> list[str]:
    d = state_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json") if _PREFIX_RE.match(p.stem))


# ----------------------------------------------------------------------------- commands


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _must(argv: list[str]) -> str:
    proc = _run(argv)
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetnsFailure(f"`{' '.join(argv)}` failed: {why[0] if why else proc.returncode}")
    return proc.stdout


def check_host() -> None:
    """Root, `ip` and `tc` present; raises NetnsError naming what is missing."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsError(f"netns: `{tool}` not found (install iproute2)")
    if os.geteuid() != 0:
        raise NetnsError("netns: needs root (network namespaces and tc); run it with sudo")


def existing_namespaces() -> set[str]:
    out = _must(["ip", "netns", "list"])
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _link_exists(name: str) -> bool:
    return _run(["ip", "link", "show", "dev", name]).returncode == 0


def _root_networks() -> list[ipaddress.IPv4Network]:
    out = _must(["ip", "-j", "-4", "addr", "show"])
    nets = []
    for iface in json.loads(out or "[]"):
        for a in iface.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return nets


def _check_free(plan: Plan) -> None:
    taken = sorted(existing_namespaces() & {w.netns for w in plan.workers})
    if taken:
        raise NetnsError(f"netns: namespace {taken[0]} already exists (another --prefix?)")
    for name in [plan.bridge, *(w.host_ifname for w in plan.workers)]:
        if _link_exists(name):
            raise NetnsError(f"netns: interface {name} already exists (another --prefix?)")
    ours = ipaddress.ip_network(plan.subnet)
    for net in _root_networks():
        if net.overlaps(ours):
            raise NetnsError(
                f"--subnet: {plan.subnet} overlaps {net}, already on this host; pick another"
            )


# ----------------------------------------------------------------------------- up / down


def up(plan: Plan) -> Plan:
    """Create everything in `plan`; on failure, remove what was made and raise."""
    check_host()
    if read_state(plan.prefix) is not None:
        raise NetnsError(
            f"netns: {plan.prefix!r} is already up (`dlion netns down --prefix {plan.prefix}`)"
        )
    _check_free(plan)
    state: dict[str, Any] = {
        "version": _STATE_VERSION,
        "status": "creating",
        "plan": plan.to_json(),
        "created": [],
    }

    def make(kind: str, name: str, argv: list[str]) -> None:
        # Recorded first: if the command half-succeeds or we are interrupted, down finds it.
        state["created"].append({"kind": kind, "name": name})
        _write_state(plan.prefix, state)
        _must(argv)

    p = str(plan.prefixlen)
    try:
        make("link", plan.bridge, ["ip", "link", "add", plan.bridge, "type", "bridge"])
        _must(["ip", "addr", "add", f"{plan.hub}/{p}", "dev", plan.bridge])
        _must(["ip", "link", "set", plan.bridge, "up"])
        for w in plan.workers:
            make("netns", w.netns, ["ip", "netns", "add", w.netns])
            ns = ["ip", "-n", w.netns]
            veth = ["ip", "link", "add", w.host_ifname, "type", "veth", "peer", "name"]
            make("link", w.host_ifname, [*veth, WORKER_IFNAME, "netns", w.netns])
            _must(["ip", "link", "set", w.host_ifname, "master", plan.bridge])
            _must(["ip", "link", "set", w.host_ifname, "up"])
            _must([*ns, "link", "set", "lo", "up"])
            _must([*ns, "addr", "add", f"{w.address}/{p}", "dev", WORKER_IFNAME])
            _must([*ns, "link", "set", WORKER_IFNAME, "up"])
            for argv in tc_commands(plan, w):
                _must(argv)
    except BaseException:
        down(plan.prefix)
        raise
    state["status"] = "up"
    _write_state(plan.prefix, state)
    return plan


def down(prefix: str) -> list[str]:
    """Remove what `up` recorded for `prefix` (what is already gone is skipped); returns
    the names removed. Safe to call any number of times."""
    state = read_state(prefix)
    if state is None:
        return []
    check_host()
    removed = []
    present = existing_namespaces()
    for item in reversed(state.get("created", [])):
        kind, name = item["kind"], item["name"]
        if kind == "netns" and name in present:
            _must(["ip", "netns", "del", name])
            removed.append(name)
        elif kind == "link" and _link_exists(name):
            _must(["ip", "link", "del", "dev", name])
            removed.append(name)
    with contextlib.suppress(FileNotFoundError):
        state_path(prefix).unlink()
    return removed


def status(prefix: str) -> dict[str, Any] | None:
    """The recorded plan of `prefix`, which of its parts exist, and per-class tc counters."""
    state = read_state(prefix)
    if state is None:
        return None
    plan = Plan.from_json(state["plan"])
    present = existing_namespaces() if shutil.which("ip") else set()
    workers = []
    for w in plan.workers:
        sent: dict[int, int] = {}
        if w.netns in present and shutil.which("tc"):
            sent = class_bytes(w.netns)
        workers.append(
            {
                "rank": w.rank,
                "netns": w.netns,
                "present": w.netns in present,
                "address": w.address,
                "nic_bps": w.nic_bps,
                "classes": [
                    {
                        "peer": c.peer,
                        "rate_bps": c.rate_bps,
                        "ceil_bps": c.ceil_bps,
                        "bytes": sent.get(int(c.classid.split(":")[1], 16)),
                    }
                    for c in w.classes
                ],
            }
        )
    return {"prefix": prefix, "status": state["status"], "plan": plan, "workers": workers}


def class_bytes(netns: str) -> dict[int, int]:
    """Bytes sent so far per htb class (by minor number) on the worker's eth0."""
    proc = _run(["tc", "-n", netns, "-s", "class", "show", "dev", WORKER_IFNAME])
    return parse_class_bytes(proc.stdout) if proc.returncode == 0 else {}


_CLASS_RE = re.compile(r"^class htb \d+:([0-9a-f]+) ")
_SENT_RE = re.compile(r"^\s*Sent (\d+) bytes")


def parse_class_bytes(text: str) -> dict[int, int]:
    """`tc -s class show` text (its JSON output omits htb classes in iproute2 6.1) ->
    {class minor: bytes sent}."""
    out: dict[int, int] = {}
    minor = None
    for line in text.splitlines():
        if m := _CLASS_RE.match(line):
            minor = int(m.group(1), 16)
        elif (m := _SENT_RE.match(line)) and minor is not None:
            out[minor] = int(m.group(1))
            minor = None
    return out


def peer_bytes(plan: Plan, rank: int) -> dict[int, int]:
    """Bytes worker `rank` has sent so far through each peer's shaped class."""
    sent = class_bytes(plan.workers[rank].netns)
    return {
        c.peer: sent.get(int(c.classid.split(":")[1], 16), 0) for c in plan.workers[rank].classes
    }


# ----------------------------------------------------------------------------- the launcher's view


@dataclass(frozen=True)
class Attachment:
    """How the launcher runs a job inside the namespaces of a prefix that is up."""

    plan: Plan

    @property
    def store_host(self) -> str:
        return self.plan.hub

    def command(self, rank: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.plan.workers[rank].netns, *argv]

    def env(self, rank: int) -> dict[str, str]:
        # gloo binds to the address the hostname resolves to, which does not exist in the
        # namespace (it would fall back to loopback, unreachable from peers): name the veth.
        return {"GLOO_SOCKET_IFNAME": WORKER_IFNAME}


def attach(cfg: ExperimentConfig, prefix: str) -> Attachment:
    """Check that `prefix` is up for this config's cluster and time scale; raise otherwise."""
    if cfg.engine.shaping == "transport":
        raise NetnsError(
            "--netns: engine.shaping=transport would shape every link twice (in the transport "
            "and in the kernel); use --set engine.shaping=kernel (or none)"
        )
    check_host()
    plan = load_plan(prefix)
    want = plan_for(cfg, prefix, plan.subnet)
    if want.links() != plan.links():
        raise NetnsError(
            f"--netns: {prefix!r} was set up for another cluster or time scale than this config "
            f"({len(plan.workers)} workers, time_scale {plan.time_scale:g}); "
            f"`dlion netns down --prefix {prefix}` and `up` it with this config"
        )
    missing = sorted({w.netns for w in plan.workers} - existing_namespaces())
    if missing:
        raise NetnsError(f"--netns: namespace {missing[0]} is gone; `down` and `up` again")
    return Attachment(plan)
