"""What a sim run does when the optimizer of some workers changes from a given time on.

RESULTS.md section 14h (microcloud-dynamic: why site a's participation after the 1 s pace
change is unstable). A driver outside the package: it wraps `WorkerContext.apply` so that,
for ranks in `--ranks` and simulated time in [--from, --until), the applied update is
multiplied by `--scale` (the same as the learning rate times that factor for everything
applied from then on) and the momentum is set to `--momentum` (back to the config's after
`--until`). It prints the time to target, the final mean accuracy and, every 0.2 s, the
mean accuracy, the weight norm of ranks 0, 2, 4 (the site leaders) and the mean norm of
what they applied (the site's summed gradient plus the remote updates, before the scale).

Usage: python benchmarks/tools17/after_change.py SCENARIO [--from S] [--until S]
           [--ranks 0,1,...] [--scale F] [--momentum B] [a.b=v ...]
e.g.   python benchmarks/tools17/after_change.py microcloud-dynamic --momentum 0.7 \
           train.lr=0.2 train.seed=0 strategy.options.lockstep_slack=0.1
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import dlion
from dlion.context import WorkerContext

LEADERS = (0, 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario")
    parser.add_argument("--from", dest="start", type=float, default=1.0)
    parser.add_argument("--until", type=float, default=float("inf"))
    parser.add_argument("--ranks", default="0,1,2,3,4,5")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--momentum", type=float, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    ranks = {int(r) for r in args.ranks.split(",")}
    base: dict[int, float] = {}
    trace: dict[int, list[tuple[float, float, float]]] = defaultdict(list)  # (t, |w|, |u|)
    original = WorkerContext.apply

    async def apply(self: WorkerContext, grad: torch.Tensor) -> None:
        groups = self.replica.optimizer.param_groups
        base.setdefault(self.rank, float(groups[0].get("momentum", 0.0)))
        inside = self.rank in ranks and args.start <= self.now() < args.until
        if args.momentum is not None:
            for group in groups:
                group["momentum"] = args.momentum if inside else base[self.rank]
        norm = float(grad.norm())
        await original(self, grad * args.scale if inside else grad)
        if self.rank in LEADERS:
            trace[self.rank].append((self.now(), float(self.replica.model_state().norm()), norm))

    WorkerContext.apply = apply  # type: ignore[method-assign]
    out = dlion.run(args.scenario, ["strategy.name=dlion", *args.overrides])
    points = out.points
    print(f"tta {out.summary.get('tta_s')} s, final mean acc {points[-1].mean_acc:.3f}")
    for point in points:
        if round(point.t * 10) % 2:
            continue
        weights, applied = [], []
        for rank in LEADERS:
            seen = [x for x in trace[rank] if x[0] <= point.t]
            recent = [x[2] for x in seen if x[0] > point.t - 0.2]
            weights.append(f"{seen[-1][1]:.1f}" if seen else "-")
            applied.append(f"{sum(recent) / len(recent):.2f}" if recent else "-")
        print(
            f"{point.t:.1f} s: acc {point.mean_acc:.3f}, |w| {'/'.join(weights)}, "
            f"|applied| {'/'.join(applied)}"
        )


if __name__ == "__main__":
    main()
