"""Vector-work costs fitted on the calibration host (see dlion.cluster.vector_cost).

Command: OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/vector_cost.py \
    --repeats 300 --write src/dlion/cluster/vector_cost_host.py
Machine: x86_64 container, cpu (Linux),
2 cores shared with parallel work, torch 2.13.0+cpu CPU, 1 thread,
Python 3.11.7; 2026-12-07; load average about 10.
Sizes [1000, 4000, 17226, 65536, 262144]; lower quartile of each size's repeats.
Regenerate with the command above; RESULTS.md section 12c has the table.
"""

# kind: (fixed seconds per call, seconds per element)
OPS: dict[str, tuple[float, float]] = {
    "axpy": (1.7795e-06, 8.9258e-11),  # max fit error 23.5%
    "sum": (5.2297e-06, 9.2597e-11),  # max fit error 9.8%
    "topk": (1.2227e-05, 5.6304e-09),  # max fit error 26.5%
    "scan": (1.5994e-05, 4.7148e-09),  # max fit error 5.2%
    "quant": (1.8597e-05, 6.7614e-10),  # max fit error 11.5%
    "sgd": (2.2479e-05, 3.4543e-10),  # max fit error 12.3%
    "adamw": (5.3236e-05, 1.0796e-09),  # max fit error 11.0%
    "adamw_tensor": (2.5762e-05, 0.0000e00),  # max fit error 36.0%
}

# The host's training step for the digits MLP [128, 64] (batches [8, 32, 64]):
# (overhead seconds, FLOP/s), the line `dlion probe` would write for this host.
HOST_STEP: tuple[float, float] = (2.5199e-04, 5.8238e10)
