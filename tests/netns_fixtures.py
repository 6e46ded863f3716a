"""Shared by the tests that need real network namespaces (`dlion netns`, root): whether the
host can make them, a free subnet, what a prefix left behind, and a cluster brought up in
namespaces for the duration of a test and always torn down (checked to be gone)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dlion.core.config import ExperimentConfig
from dlion.engines import netns


def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (iproute2)"
    probe = f"dlionprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        htb = subprocess.run(
            ["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"],
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if htb.returncode != 0:
        return f"tc htb unavailable: {htb.stderr.strip()}"
    return None


SKIP = _netns_unavailable()
needs_netns = pytest.mark.skipif(SKIP is not None, reason=f"netns: {SKIP}")


def free_subnet() -> str:
    """A /24 in 10.77.0.0/16 that no address on this host overlaps."""
    used = netns._root_networks()
    for i in range(1, 255):
        net = ipaddress.ip_network(f"10.77.{i}.0/24")
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free /24 in 10.77.0.0/16")


def leftovers(prefix: str) -> list[str]:
    """Namespaces and interfaces of `prefix` that still exist."""
    names = netns.existing_namespaces()
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    found = [n for n in names if n.startswith(f"{prefix}-")]
    found += [line.split("@")[0].split()[0] for line in links.splitlines()]
    return [n for n in found if n.startswith(f"{prefix}-")]


@contextmanager
def cluster_up(cfg: ExperimentConfig, tag: str) -> Iterator[netns.Plan]:
    """`cfg`'s cluster up in namespaces (prefix TAG + pid, its own state directory); always
    torn down, and the test fails if anything of it is left behind. `tag`: two letters, one
    per test module, so modules running side by side never collide."""
    prefix = f"{tag}{os.getpid() % 1_000_000}"
    old = os.environ.get(netns.STATE_DIR_ENV)
    state = Path(f"/tmp/dlion-netns-{tag}-{os.getpid()}")
    os.environ[netns.STATE_DIR_ENV] = str(state)
    try:
        yield netns.up(netns.plan_for(cfg, prefix, free_subnet()))
    finally:
        netns.down(prefix)
        left = leftovers(prefix)
        shutil.rmtree(state, ignore_errors=True)
        if old is None:
            os.environ.pop(netns.STATE_DIR_ENV, None)
        else:
            os.environ[netns.STATE_DIR_ENV] = old
        assert left == [], f"left behind: {left}"
