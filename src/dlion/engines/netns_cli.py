"""`dlion netns`: one network namespace per worker, links shaped by tc (root only).

    dlion netns up microcloud-hetero --set engine.time_scale=4
    dlion train microcloud-hetero --engine dist --set engine.time_scale=4 \\
        --set engine.shaping=kernel --netns dlion
    dlion netns down
"""

from __future__ import annotations

from typing import Annotated

import typer

from dlion.cli.options import wide_console
from dlion.engines.netns import DEFAULT_PREFIX, DEFAULT_SUBNET

app = typer.Typer(
    help="Kernel-shaped links for `--engine dist`: a namespace per worker, tc htb per link.",
    no_args_is_help=True,
    add_completion=False,
)
console = wide_console()

PrefixOption = Annotated[
    str, typer.Option(help="Names the namespaces (PREFIX-RANK), bridge and state file.")
]


def _mbit(bps: int | None) -> str:
    return "-" if bps is None else f"{bps / 1e6:.3g}"


@app.command()
def up(
    scenario: Annotated[str, typer.Argument(help="YAML config path or shipped scenario name.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field (engine.time_scale scales rates)."),
    ] = None,
    prefix: PrefixOption = DEFAULT_PREFIX,
    subnet: Annotated[
        str, typer.Option(help="Private IPv4 subnet: workers .1.., the hub its last host.")
    ] = DEFAULT_SUBNET,
) -> None:
    """Create a namespace per worker behind a router namespace per site, and tc classes per
    link and per shared site pipe."""
    from dlion.core.config import load_config
    from dlion.engines import netns

    cfg = load_config(scenario, list(set_ or []))
    plan = netns.up(netns.plan_for(cfg, prefix, subnet))
    console.print(
        f"{cfg.name}: {len(plan.workers)} namespaces {plan.prefix}-0..{len(plan.workers) - 1} "
        f"on {plan.subnet} (bridge {plan.bridge}, store at {plan.hub}), rates / time_scale "
        f"{plan.time_scale:g}"
    )
    for w in plan.workers:
        links = ", ".join(
            f"->{c.peer} " + (f"via {c.via}" if c.via else f"{_mbit(c.ceil_bps)} Mbit/s")
            for c in w.classes
        )
        console.print(
            f"  {w.netns} {w.address} ({w.site}): NIC {_mbit(w.nic_bps)} Mbit/s; {links}",
            soft_wrap=True,
        )
    for r in plan.routers:
        pipes = ", ".join(f"->{c.site} {_mbit(c.ceil_bps)} Mbit/s" for c in r.pipes)
        console.print(
            f"  {r.netns} router of {r.site}: uplink {_mbit(r.uplink_bps)}, downlink "
            f"{_mbit(r.downlink_bps)} Mbit/s; shared pipes {pipes or 'none'}",
            soft_wrap=True,
        )
    console.print(
        f"run: dlion train {scenario} --engine dist --set engine.shaping=kernel "
        f"--netns {plan.prefix} (same --set)",
        soft_wrap=True,
    )


@app.command()
def down(prefix: PrefixOption = DEFAULT_PREFIX) -> None:
    """Remove everything `up` made for PREFIX (nothing if it is not up)."""
    from dlion.engines import netns

    removed = netns.down(prefix)
    if removed:
        console.print(f"{prefix}: removed {', '.join(removed)}", soft_wrap=True)
    else:
        console.print(f"{prefix}: nothing to remove")


@app.command()
def status(
    prefix: Annotated[
        str | None, typer.Option(help="One prefix (default: all that are up).")
    ] = None,
) -> None:
    """What is up: namespaces, addresses, per-link rates and bytes sent through each."""
    from dlion.engines import netns

    prefixes = [netns.check_prefix(prefix)] if prefix else netns.list_prefixes()
    if not prefixes:
        console.print(f"no dlion namespaces are up (state in {netns.state_dir()})")
        return
    for p in prefixes:
        st = netns.status(p)
        if st is None:
            console.print(f"{p}: not up")
            continue
        plan = st["plan"]
        console.print(
            f"{p}: {st['status']}, {len(plan.workers)} workers on {plan.subnet}, store at "
            f"{plan.hub}, time_scale {plan.time_scale:g}"
        )
        for w in st["workers"]:
            links = ", ".join(
                f"->{c['peer']} "
                + (f"via {c['via']}" if c["via"] else f"{_mbit(c['ceil_bps'])} Mbit/s")
                + ("" if c["bytes"] is None else f" ({c['bytes'] / 1e6:.2f} MB)")
                for c in w["classes"]
            )
            state = "" if w["present"] else " (MISSING)"
            console.print(f"  {w['netns']}{state} {w['address']}: {links}", soft_wrap=True)
        for r in st["routers"]:
            pipes = ", ".join(
                f"->{c['site']} {_mbit(c['ceil_bps'])} Mbit/s"
                + ("" if c["bytes"] is None else f" ({c['bytes'] / 1e6:.2f} MB)")
                for c in r["pipes"]
            )
            state = "" if r["present"] else " (MISSING)"
            console.print(
                f"  {r['netns']}{state} router of {r['site']}: {pipes or 'no pipes'}",
                soft_wrap=True,
            )
