"""Calibrate the vector-work cost model (src/dlion/cluster/vector_cost.py) on this host.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/vector_cost.py [--repeats N]
        [--write src/dlion/cluster/vector_cost_host.py]

Times each kind of vector work (one representative op per kind, vector_cost.KINDS) at
several sizes with torch on 1 CPU thread, sizes taking turns so a neighbour's load hits
every size alike, each size's time the lower quartile of its repeats (the op as the host
runs it undisturbed, as `dlion probe` times steps); fits fixed + per-element seconds per
kind (vector_cost.fit_op) and the host's training-step line for the digits MLP
(probe.fit_step_time). Prints a table; with --write, writes the constants module the
package ships.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

from dlion.cluster.vector_cost import KINDS, Fit, OpCost, fit_op
from dlion.core.config import load_config
from dlion.probe.measure import fit_step_time, flops_per_sample, measure_step_times
from dlion.training.optim import FlatSGD

SIZES = [1_000, 4_000, 17_226, 65_536, 262_144]
STEP_BATCHES = [8, 32, 64]


def _op(kind: str, n: int) -> tuple[Callable[[], object], int]:
    """A closure doing one op of `kind` over vectors of length n, and the numel it charges."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    y = torch.randn(n, generator=g)
    if kind == "axpy":
        return (lambda: y.add_(x, alpha=0.5)), n
    if kind == "sum":
        vs = [torch.randn(n, generator=g) for _ in range(4)]

        def total() -> object:
            acc = vs[0].clone()
            for v in vs[1:]:
                acc.add_(v)
            return acc

        return total, 4 * n
    if kind == "topk":
        k = max(1, n // 100)
        return (lambda: torch.topk(x.abs(), k, sorted=False)), n
    if kind == "scan":
        return (lambda: torch.nonzero(x.abs() > 0.5 * y.abs()).reshape(-1)), n

    if kind == "quant":

        def quant() -> object:
            scale = x.abs().max() / 1.5
            q = torch.clamp(torch.round(x / scale), -2, 1).to(torch.int8)
            return q.to(torch.float32) * scale

        return quant, n
    if kind == "adamw_tensor":
        # The step over 6 tensors (the digits MLP's layout: 3 weights, 3 biases) holding
        # the same n elements; its excess over the 1-tensor step, per extra tensor, is this
        # kind's cost (`time_adamw_tensor` subtracts).
        bounds = [0, n // 3, n // 3 + 8, 2 * n // 3, 2 * n // 3 + 8, n - 2, n]
        parts = [torch.nn.Parameter(x[a:b].clone()) for a, b in itertools.pairwise(bounds)]
        for q in parts:
            q.grad = torch.randn(q.shape, generator=g)
        return torch.optim.AdamW(parts, lr=0.01, foreach=False).step, n
    p = torch.nn.Parameter(x.clone())
    p.grad = y.clone()
    if kind == "sgd":
        opt: torch.optim.Optimizer = FlatSGD([p], lr=0.01, momentum=0.9)
    elif kind == "adamw":
        opt = torch.optim.AdamW([p], lr=0.01, foreach=False)
    else:
        raise ValueError(kind)
    return opt.step, n


def time_kind(kind: str, repeats: int) -> tuple[list[int], list[float]]:
    ops = [_op(kind, n) for n in SIZES]
    for fn, _ in ops:
        for _ in range(3):
            fn()
    times: list[list[float]] = [[] for _ in SIZES]
    for _ in range(repeats):
        for i, (fn, _) in enumerate(ops):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    quartiles = [sorted(t)[(len(t) - 1) // 4] for t in times]
    return [numel for _, numel in ops], quartiles


def time_adamw_tensor(repeats: int) -> Fit:
    """Per extra tensor: (6-tensor step - 1-tensor step) / 5, the median over the sizes;
    no per-element part (the elements are the same)."""
    _, six = time_kind("adamw_tensor", repeats)
    _, one = time_kind("adamw", repeats)
    extra = sorted((a - b) / 5 for a, b in zip(six, one, strict=True))
    median = extra[len(extra) // 2]
    spread = max(abs(e - median) / median for e in extra)
    return Fit(OpCost(max(median, 0.0), 0.0), spread)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--write", default=None, help="write the constants module here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    fits: dict[str, Fit] = {}
    print(f"| kind | fixed (us) | per element (ns) | max fit error | measured at {SIZES} (us) |")
    print("|---|---:|---:|---:|---|")
    for kind in KINDS:
        if kind == "adamw_tensor":
            fit = fits[kind] = time_adamw_tensor(args.repeats)
            print(f"| {kind} | {fit.cost.fixed_s * 1e6:.2f} | 0 | {fit.max_rel_error * 100:.1f}% |")
            continue
        sizes, seconds = time_kind(kind, args.repeats)
        fit = fits[kind] = fit_op(sizes, seconds)
        shown = ", ".join(f"{t * 1e6:.1f}" for t in seconds)
        print(
            f"| {kind} | {fit.cost.fixed_s * 1e6:.2f} | {fit.cost.per_element_s * 1e9:.3f} | "
            f"{fit.max_rel_error * 100:.1f}% | {shown} |"
        )
    cfg = load_config("homogeneous")
    steps = measure_step_times(cfg, STEP_BATCHES, args.repeats)
    line = fit_step_time(list(steps), list(steps.values()))
    flops = flops_per_sample(cfg)
    host_flops = line.samples_per_s * flops
    print(
        f"host step (digits MLP, {flops} FLOPs/sample): {line.overhead_s * 1e3:.4f} ms + "
        f"b x {1e6 / line.samples_per_s:.3f} us = {host_flops / 1e9:.2f} GFLOP/s marginal; "
        f"measured {', '.join(f'b={b}: {t * 1e3:.4f} ms' for b, t in steps.items())}"
    )
    if args.write:
        _write(args.write, fits, line.overhead_s, host_flops, args.repeats)
        print(f"wrote {args.write}")
    return 0


def _write(path: str, fits: dict[str, Fit], overhead: float, host_flops: float, rep: int) -> None:
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    rows = "\n".join(
        f'    "{k}": ({f.cost.fixed_s:.4e}, {f.cost.per_element_s:.4e}),'
        f"  # max fit error {f.max_rel_error * 100:.1f}%"
        for k, f in fits.items()
    )
    text = f'''"""Vector-work costs fitted on the calibration host (see dlion.cluster.vector_cost).

Command: OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/vector_cost.py \\
    --repeats {rep} --write src/dlion/cluster/vector_cost_host.py
Machine: {platform.machine()} container, {platform.processor() or "cpu"} ({platform.system()}),
2 cores shared with parallel work, torch {torch.__version__} CPU, 1 thread,
Python {sys.version.split()[0]}; {today}; load average {os.getloadavg()[0]:.1f}.
Sizes {SIZES}; lower quartile of each size's repeats.
Regenerate with the command above; RESULTS.md section 12c has the table.
"""

# kind: (fixed seconds per call, seconds per element)
OPS: dict[str, tuple[float, float]] = {{
{rows}
}}

# The host's training step for the digits MLP [128, 64] (batches {STEP_BATCHES}):
# (overhead seconds, FLOP/s), the line `dlion probe` would write for this host.
HOST_STEP: tuple[float, float] = ({overhead:.4e}, {host_flops:.4e})
'''
    with open(path, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
