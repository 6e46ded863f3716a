"""Vector-work costs fitted on the calibration host (see dlion.vector_cost).

Command: OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/vector_cost.py \
    --repeats 300 --write src/dlion/vector_cost_host.py
Machine: x86_64 container, cpu (Linux),
2 cores shared with parallel work, torch 2.13.0+cpu CPU, 1 thread,
Python 3.11.7; 2026-12-07. Sizes [1000, 4000, 17226, 65536, 262144]; lower quartile of each size's
repeats. Regenerate with the command above; RESULTS.md section 12c has the table.
"""

# kind: (fixed seconds per call, seconds per element)
OPS: dict[str, tuple[float, float]] = {
    "axpy": (1.7473e-06, 8.9298e-11),  # max fit error 24.8%
    "sum": (4.9796e-06, 9.2879e-11),  # max fit error 9.1%
    "topk": (4.3848e-06, 5.4394e-09),  # max fit error 20.6%
    "scan": (1.4857e-05, 4.6538e-09),  # max fit error 6.1%
    "quant": (1.7654e-05, 6.8023e-10),  # max fit error 12.9%
    "sgd": (2.2026e-05, 3.3986e-10),  # max fit error 11.2%
    "adamw": (5.0026e-05, 1.0693e-09),  # max fit error 9.0%
}

# The host's training step for the digits MLP [128, 64] (batches [8, 32, 64]):
# (overhead seconds, FLOP/s), the line `dlion probe` would write for this host.
HOST_STEP: tuple[float, float] = (2.4152e-04, 6.3334e10)
