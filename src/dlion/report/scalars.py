"""Per-run scalars for other tools: a plain CSV always, TensorBoard event files when the
`tensorboard` package is installed (`pip install dlion[tensorboard]`).

`DIR/scalars.csv` has one row per evaluation: t (simulated or wall seconds, as in
metrics.jsonl), iteration, mean_acc, min_acc (the worst replica), mean_loss, bytes_sent.
`DIR/tensorboard/` holds the same series (`metric/mean`, `metric/worst`, `loss/mean`,
`bytes_sent`) with the iteration as the step and the run's time as the wall time, so
TensorBoard's "relative" axis is the run's time: `tensorboard --logdir runs/`.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from dlion.report.metrics import EvalPoint

CSV_FILE = "scalars.csv"
TENSORBOARD_DIR = "tensorboard"
CSV_COLUMNS = ("t", "iteration", "mean_acc", "min_acc", "mean_loss", "bytes_sent")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def write_csv(points: Sequence[EvalPoint], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for p in points:
            writer.writerow(
                [repr(float(p.t)), p.iteration, p.mean_acc, p.min_acc, p.mean_loss, p.bytes_sent]
            )


def write_tensorboard(points: Sequence[EvalPoint], log_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for p in points:
            step, wall = p.iteration, p.t
            writer.add_scalar("metric/mean", p.mean_acc, step, walltime=wall)
            writer.add_scalar("metric/worst", p.min_acc, step, walltime=wall)
            writer.add_scalar("loss/mean", p.mean_loss, step, walltime=wall)
            writer.add_scalar("bytes_sent", p.bytes_sent, step, walltime=wall)


def write_scalars(points: Sequence[EvalPoint], out_dir: Path) -> list[str]:
    """Write the CSV (and the TensorBoard events when available); return what was written."""
    write_csv(points, out_dir / CSV_FILE)
    if not tensorboard_available():
        return [CSV_FILE]
    write_tensorboard(points, out_dir / TENSORBOARD_DIR)
    return [CSV_FILE, f"{TENSORBOARD_DIR}/"]
