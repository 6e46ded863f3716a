"""Where the sim's loop time goes, by kind of work (RESULTS.md section 16, issue 18).

    python benchmarks/sim_profile.py STRATEGY [SCENARIO]

cProfile of the event loop alone (set-up excluded) of one default run, each function's
own time summed by where it lives: asyncio's machinery, the network model, the rest of
the sim engine, strategy / context / collectives Python, torch.topk, and everything else
(torch ops of the gradient, the optimizer, evaluation). The profiler inflates Python
against C++ time, so shares are indicative; the gradient's cumulative time is printed
beside them.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from typing import Any

import dlion.engines.sim as sim
from dlion.core.config import load_config


def category(filename: str, name: str) -> str:
    if "asyncio" in filename or "selectors" in filename or "_contextvars" in name:
        return "asyncio machinery"
    if "engines/network" in filename or filename.endswith("cluster/topology.py"):
        return "network model"
    if "engines/" in filename:
        return "sim engine other"
    if any(part in filename for part in ("strategies/", "comm/", "context.py")):
        return "strategy/context/collectives (Python)"
    if "topk" in name:
        return "torch.topk"
    return "other (torch ops, replica, eval...)"


def main() -> None:
    strategy = sys.argv[1]
    scenario = sys.argv[2] if len(sys.argv) > 2 else "microcloud-hetero"
    cfg = load_config(scenario, [f"strategy.name={strategy}", "strategy.options={}"])
    profile = cProfile.Profile()
    loop_main = sim._main

    async def profiled(engine: Any, bar: Any) -> Any:
        profile.enable()
        try:
            return await loop_main(engine, bar)
        finally:
            profile.disable()

    sim._main = profiled  # type: ignore[assignment]
    sim.run_sim(cfg, progress=False)
    stats: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    cumulative = {f"{k[0]}:{k[2]}": v[3] for k, v in stats.items()}
    grad = sum(v for k, v in cumulative.items() if k.endswith("replica.py:gradient"))
    evaluation = sum(v for k, v in cumulative.items() if k.endswith("sim.py:evaluate"))
    shares: dict[str, float] = {}
    for (filename, _, name), v in stats.items():
        c = category(filename, name)
        shares[c] = shares.get(c, 0.0) + v[2]
    print(
        f"{strategy}: profiled loop {total:.2f} s; gradient (cumulative) {grad:.2f} s; "
        f"evaluation {evaluation:.2f} s"
    )
    for c, v in sorted(shares.items(), key=lambda x: -x[1]):
        print(f"  {c:42s} {v:6.2f} s  {100 * v / total:5.1f} %")


if __name__ == "__main__":
    main()
