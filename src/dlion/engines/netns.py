"""Kernel-shaped links for the dist engine: one network namespace per worker, behind one
router namespace per site.

`up(cfg, prefix)` builds, for a scenario's N workers in S sites:

- namespaces PREFIX-0 .. PREFIX-(N-1), each with `lo` up and one veth end named `eth0`
  holding the worker's address on a private subnet (default 10.77.0.0/24: workers .1 ..
  .N);
- a router namespace per site, PREFIX-s0 .. PREFIX-s(S-1) (sites in order of first
  worker), holding a bridge `br0` that joins the other ends of its workers' veths
  (PREFIX-hRANK) and its WAN veth `wan`, whose other end (PREFIX-uSITE) sits on the core
  bridge PREFIX-br in the root namespace. The core bridge holds the hub address (the
  subnet's last host, .254), where the launcher, which stays in the root namespace, hosts
  the job's store. All of it is one L2 segment: the routers forward by bridging, so
  addresses need no routes, and all inter-site traffic of a site leaves through its `wan`;
- shaping with tc htb, as the sim's network model (dlion.cluster.topology) describes it:
  - on each router's `wan` egress, one class per destination site at that site pipe's
    rate, selected by u32 filters on the destination site's worker addresses: every flow
    from this site to that one shares it, and the kernel does the sharing. Where the site
    has an uplink, the pipe classes hang under one class at the uplink rate (each
    guaranteed an equal share, each allowed up to min(pipe, uplink));
  - where a site has a downlink, on the core's port to it (PREFIX-uSITE, root namespace)
    egress: one class at the downlink rate for traffic from the other sites' workers;
  - on each worker's `eth0`: one class per peer. A peer with a link of its own (same site,
    or a per-pair `workers` entry) is shaped there at that link's rate; a peer behind a
    site pipe is left to the routers (unshaped here). Where the worker has a NIC rate,
    the peer classes hang under one class at the NIC rate (each guaranteed an equal share,
    each allowed up to min(link, NIC)), so transfers to several peers share the NIC;
  - traffic of per-pair links between sites bypasses the pipes (a filter on source and
    destination before the pipe filters), and traffic to or from the hub (the store:
    registration, heartbeats, snapshots) is never shaped: it is not training traffic, and
    the transport shaper does not charge it either.
  Rates are bytes/s / engine.time_scale, as the transport shaper scales them.

Rates are line rates: packet headers count against them, so TCP payload goodput is a few
percent below the configured rate (about 95% for full-size frames), as on a real link.
netem is not available here, so latency stays in the dist engine (engine.shaping=kernel
delivers each message its link's latency after it arrived and leaves the bandwidth to
tc). Bandwidth traces (`dynamics.bandwidth`) are not followed: the classes keep the
scenario's base rates.

What `up` creates is recorded, before each step, in a JSON state file
(/run/dlion/netns/PREFIX.json, or $DLION_NETNS_DIR), so `down(prefix)` removes exactly
that, also after a failed or interrupted `up`, and is idempotent. Deleting a namespace
removes its veth pairs and its qdiscs with it.
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

from dlion.cluster.topology import Cluster
from dlion.core.config import ExperimentConfig
from dlion.core.errors import BadInput, DlionError
from dlion.core.timescale import TimeScale

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
_STATE_VERSION = 2  # 2: router namespaces per site
ROUTER_BRIDGE = "br0"  # inside a router namespace: its site's LAN
ROUTER_WAN = "wan"  # inside a router namespace: its veth to the core bridge


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
    via: str | None = None  # the peer's site when a site pipe (on the routers) shapes it


@dataclass(frozen=True)
class PipeClass:
    """One htb class on a router's wan: the pipe to site `site`, matched by destination."""

    site: str
    dsts: tuple[str, ...]  # the addresses of that site's workers
    classid: str
    parent: str
    rate_bps: int
    ceil_bps: int


@dataclass(frozen=True)
class WorkerNet:
    rank: int
    site: str
    netns: str
    host_ifname: str  # the veth end on its router's bridge (in the router namespace)
    address: str
    nic_bps: int | None
    classes: tuple[PeerClass, ...]


@dataclass(frozen=True)
class SiteRouter:
    site: str
    netns: str
    host_ifname: str  # the wan veth's end on the core bridge (root namespace)
    uplink_bps: int | None
    downlink_bps: int | None
    pipes: tuple[PipeClass, ...]
    # (src, dst) addresses of per-pair links that leave or enter this site: not on a pipe.
    bypass: tuple[tuple[str, str], ...]
    # Addresses of the other sites' workers: what the downlink class matches.
    foreign: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    prefix: str
    subnet: str
    bridge: str
    hub: str  # the bridge's address: where the job's store listens
    time_scale: float
    workers: tuple[WorkerNet, ...]
    routers: tuple[SiteRouter, ...]

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def links(self) -> dict[str, Any]:
        """What shapes traffic, independent of names and addresses (to match a config)."""
        return {
            "time_scale": self.time_scale,
            "workers": [
                {
                    "site": w.site,
                    "nic_bps": w.nic_bps,
                    "classes": [[c.peer, c.rate_bps, c.ceil_bps, c.via] for c in w.classes],
                }
                for w in self.workers
            ],
            "routers": [
                {
                    "site": r.site,
                    "uplink_bps": r.uplink_bps,
                    "downlink_bps": r.downlink_bps,
                    "pipes": [[c.site, c.rate_bps, c.ceil_bps] for c in r.pipes],
                    "bypass": len(r.bypass),
                }
                for r in self.routers
            ],
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Plan:
        workers = tuple(
            WorkerNet(**{**w, "classes": tuple(PeerClass(**c) for c in w["classes"])})
            for w in raw["workers"]
        )
        routers = tuple(
            SiteRouter(
                **{
                    **r,
                    "pipes": tuple(
                        PipeClass(**{**c, "dsts": tuple(c["dsts"])}) for c in r["pipes"]
                    ),
                    "bypass": tuple((a, b) for a, b in r["bypass"]),
                    "foreign": tuple(r["foreign"]),
                }
            )
            for r in raw["routers"]
        )
        return cls(**{**raw, "workers": workers, "routers": routers})


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise NetnsError(
            f"--prefix: {prefix!r} must be 1-8 lowercase letters or digits, starting with a "
            "letter (it names namespaces and interfaces, which have a 15-character limit)"
        )
    return prefix


def _bps(bytes_per_s: float, time_scale: float) -> int:
    return max(1, round(TimeScale(time_scale).rate(bytes_per_s * 8)))


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
    sites = cluster.sites()
    if len(sites) > 999:
        raise NetnsError(f"netns: {len(sites)} sites; at most 999 (interface names)")
    workers = []
    for w in cluster.workers:
        peers = [p for p in range(cluster.size) if p != w.rank]
        nic = None if w.nic_bytes_per_s is None else _bps(w.nic_bytes_per_s, time_scale)
        classes = []
        for p in peers:
            shared_pair = cluster.is_shared(w.rank, p)
            via = cluster.workers[p].site if shared_pair else None
            # A peer behind a site pipe is shaped on the routers: unshaped here.
            link = (
                UNSHAPED_BPS if shared_pair else _bps(cluster.link(w.rank, p).bandwidth, time_scale)
            )
            if nic is None:
                rate, ceil, parent = link, link, "1:"
            else:
                # Guaranteed shares add up to the NIC; each may borrow up to its link.
                rate = max(1, min(link, nic // len(peers)))
                ceil, parent = min(link, nic), "1:1"
            classes.append(PeerClass(p, addresses[p], f"1:{0x100 + p:x}", parent, rate, ceil, via))
        workers.append(
            WorkerNet(
                w.rank,
                w.site,
                f"{prefix}-{w.rank}",
                f"{prefix}-h{w.rank}",
                addresses[w.rank],
                nic,
                tuple(classes),
            )
        )
    shared = cluster.shared_capacities()
    routers = []
    for i, site in enumerate(sites):
        up = shared.get(("up", site, ""))
        down = shared.get(("down", site, ""))
        up_bps = None if up is None else _bps(up, time_scale)
        others = [s for s in sites if s != site and ("site", site, s) in shared]
        pipes = []
        for j, other in enumerate(others):
            pipe = _bps(shared[("site", site, other)], time_scale)
            if up_bps is None:
                rate, ceil, parent = pipe, pipe, "1:"
            else:
                rate = max(1, min(pipe, up_bps // len(others)))
                ceil, parent = min(pipe, up_bps), "1:1"
            dsts = tuple(addresses[w.rank] for w in cluster.workers if w.site == other)
            pipes.append(PipeClass(other, dsts, f"1:{0x100 + j:x}", parent, rate, ceil))
        mine = {w.rank for w in cluster.workers if w.site == site}
        bypass = tuple(
            (addresses[a.rank], addresses[b.rank])
            for a in cluster.workers
            for b in cluster.workers
            if a.site != b.site
            and (a.rank in mine or b.rank in mine)
            and not cluster.is_shared(a.rank, b.rank)
        )
        foreign = tuple(addresses[w.rank] for w in cluster.workers if w.rank not in mine)
        routers.append(
            SiteRouter(
                site,
                f"{prefix}-s{i}",
                f"{prefix}-u{i}",
                up_bps,
                None if down is None else _bps(down, time_scale),
                tuple(pipes),
                bypass,
                foreign,
            )
        )
    return Plan(
        prefix,
        str(net),
        f"{prefix}-br",
        str(hosts[-1]),
        time_scale,
        tuple(workers),
        tuple(routers),
    )


def plan_for(cfg: ExperimentConfig, prefix: str, subnet: str = DEFAULT_SUBNET) -> Plan:
    return make_plan(
        Cluster.from_config(cfg.cluster),
        time_scale=cfg.engine.time_scale,
        prefix=prefix,
        subnet=subnet,
    )


def _htb_root(tc: list[str], dev: str) -> list[list[str]]:
    """An htb root whose default class 1:2 (traffic no filter picks) is unshaped."""
    return [
        [*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "2"],
        _htb_class(tc, dev, "1:", "1:2", UNSHAPED_BPS, UNSHAPED_BPS),
    ]


def _htb_class(
    tc: list[str], dev: str, parent: str, classid: str, rate: int, ceil: int
) -> list[str]:
    argv = [
        *tc, "class", "add", "dev", dev, "parent", parent, "classid", classid, "htb",
        "rate", f"{rate}bit", "ceil", f"{ceil}bit", "quantum", str(_quantum(rate)),
    ]  # fmt: skip
    if rate >= UNSHAPED_BPS:
        # htb's default burst rounds to 0 bytes at this rate.
        argv += ["burst", UNSHAPED_BURST, "cburst", UNSHAPED_BURST]
    return argv


def _u32(
    tc: list[str],
    dev: str,
    prio: int,
    flowid: str,
    *,
    src: str | None = None,
    dst: str | None = None,
) -> list[str]:
    match = []
    if src is not None:
        match += ["match", "ip", "src", f"{src}/32"]
    if dst is not None:
        match += ["match", "ip", "dst", f"{dst}/32"]
    return [
        *tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", str(prio),
        "u32", *match, "flowid", flowid,
    ]  # fmt: skip


def tc_commands(w: WorkerNet) -> list[list[str]]:
    """The `tc` argv lists that shape worker `w`'s egress (run inside its namespace)."""
    tc = ["tc", "-n", w.netns]
    cmds = _htb_root(tc, WORKER_IFNAME)
    if w.nic_bps is not None:
        cmds.append(_htb_class(tc, WORKER_IFNAME, "1:", "1:1", w.nic_bps, w.nic_bps))
    for c in w.classes:
        cmds.append(_htb_class(tc, WORKER_IFNAME, c.parent, c.classid, c.rate_bps, c.ceil_bps))
        cmds.append(_u32(tc, WORKER_IFNAME, 1, c.classid, dst=c.dst))
    return cmds


def router_tc_commands(r: SiteRouter) -> list[list[str]]:
    """The `tc` argv lists that shape router `r`'s wan egress: its site's pipes to every
    other site (under its uplink, where it has one); per-pair links bypass them."""
    tc = ["tc", "-n", r.netns]
    cmds = _htb_root(tc, ROUTER_WAN)
    if r.uplink_bps is not None:
        cmds.append(_htb_class(tc, ROUTER_WAN, "1:", "1:1", r.uplink_bps, r.uplink_bps))
    for src, dst in r.bypass:
        cmds.append(_u32(tc, ROUTER_WAN, 1, "1:2", src=src, dst=dst))
    for c in r.pipes:
        cmds.append(_htb_class(tc, ROUTER_WAN, c.parent, c.classid, c.rate_bps, c.ceil_bps))
        cmds += [_u32(tc, ROUTER_WAN, 2, c.classid, dst=d) for d in c.dsts]
    return cmds


def downlink_tc_commands(r: SiteRouter) -> list[list[str]]:
    """The `tc` argv lists for router `r`'s downlink, where it has one: on the core bridge's
    port to the site (root namespace), one class for traffic from the other sites."""
    if r.downlink_bps is None:
        return []
    tc = ["tc"]
    cmds = _htb_root(tc, r.host_ifname)
    cmds.append(_htb_class(tc, r.host_ifname, "1:", "1:1", r.downlink_bps, r.downlink_bps))
    for src, dst in r.bypass:
        cmds.append(_u32(tc, r.host_ifname, 1, "1:2", src=src, dst=dst))
    cmds += [_u32(tc, r.host_ifname, 2, "1:1", src=a) for a in r.foreign]
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
            nets.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return nets


def _check_free(plan: Plan) -> None:
    ours = {w.netns for w in plan.workers} | {r.netns for r in plan.routers}
    taken = sorted(existing_namespaces() & ours)
    if taken:
        raise NetnsError(f"netns: namespace {taken[0]} already exists (another --prefix?)")
    for name in [plan.bridge, *(r.host_ifname for r in plan.routers)]:
        if _link_exists(name):
            raise NetnsError(f"netns: interface {name} already exists (another --prefix?)")
    subnet = ipaddress.ip_network(plan.subnet)
    for net in _root_networks():
        if net.overlaps(subnet):
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
        routers = {r.site: r for r in plan.routers}
        for r in plan.routers:
            make("netns", r.netns, ["ip", "netns", "add", r.netns])
            ns = ["ip", "-n", r.netns]
            _must([*ns, "link", "set", "lo", "up"])
            _must([*ns, "link", "add", ROUTER_BRIDGE, "type", "bridge"])
            _must([*ns, "link", "set", ROUTER_BRIDGE, "up"])
            veth = ["ip", "link", "add", r.host_ifname, "type", "veth", "peer", "name"]
            make("link", r.host_ifname, [*veth, ROUTER_WAN, "netns", r.netns])
            _must(["ip", "link", "set", r.host_ifname, "master", plan.bridge])
            _must(["ip", "link", "set", r.host_ifname, "up"])
            _must([*ns, "link", "set", ROUTER_WAN, "master", ROUTER_BRIDGE])
            _must([*ns, "link", "set", ROUTER_WAN, "up"])
            for argv in router_tc_commands(r) + downlink_tc_commands(r):
                _must(argv)
        for w in plan.workers:
            router = routers[w.site]
            make("netns", w.netns, ["ip", "netns", "add", w.netns])
            ns = ["ip", "-n", w.netns]
            # Its veth joins the worker to its site's router (deleted with either namespace).
            veth = ["ip", "link", "add", w.host_ifname, "netns", router.netns, "type", "veth"]
            _must([*veth, "peer", "name", WORKER_IFNAME, "netns", w.netns])
            rns = ["ip", "-n", router.netns]
            _must([*rns, "link", "set", w.host_ifname, "master", ROUTER_BRIDGE])
            _must([*rns, "link", "set", w.host_ifname, "up"])
            _must([*ns, "link", "set", "lo", "up"])
            _must([*ns, "addr", "add", f"{w.address}/{p}", "dev", WORKER_IFNAME])
            _must([*ns, "link", "set", WORKER_IFNAME, "up"])
            for argv in tc_commands(w):
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
                        "via": c.via,
                        "rate_bps": c.rate_bps,
                        "ceil_bps": c.ceil_bps,
                        "bytes": sent.get(int(c.classid.split(":")[1], 16)),
                    }
                    for c in w.classes
                ],
            }
        )
    routers = []
    for r in plan.routers:
        sent = {}
        if r.netns in present and shutil.which("tc"):
            sent = class_bytes(r.netns, ROUTER_WAN)
        routers.append(
            {
                "site": r.site,
                "netns": r.netns,
                "present": r.netns in present,
                "uplink_bps": r.uplink_bps,
                "downlink_bps": r.downlink_bps,
                "pipes": [
                    {
                        "site": c.site,
                        "rate_bps": c.rate_bps,
                        "ceil_bps": c.ceil_bps,
                        "bytes": sent.get(int(c.classid.split(":")[1], 16)),
                    }
                    for c in r.pipes
                ],
            }
        )
    return {
        "prefix": prefix,
        "status": state["status"],
        "plan": plan,
        "workers": workers,
        "routers": routers,
    }


def class_bytes(netns: str, dev: str = WORKER_IFNAME) -> dict[int, int]:
    """Bytes sent so far per htb class (by minor number) on `dev` in `netns` (default: a
    worker's eth0)."""
    proc = _run(["tc", "-n", netns, "-s", "class", "show", "dev", dev])
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


def pipe_bytes(plan: Plan, site: str) -> dict[str, int]:
    """Bytes site `site` has sent so far through its pipe to each other site."""
    router = next(r for r in plan.routers if r.site == site)
    sent = class_bytes(router.netns, ROUTER_WAN)
    return {c.site: sent.get(int(c.classid.split(":")[1], 16), 0) for c in router.pipes}


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
    ours = {w.netns for w in plan.workers} | {r.netns for r in plan.routers}
    missing = sorted(ours - existing_namespaces())
    if missing:
        raise NetnsError(f"--netns: namespace {missing[0]} is gone; `down` and `up` again")
    return Attachment(plan)
