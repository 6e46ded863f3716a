"""Run metrics: eval points, the JSONL metrics log, time-to-accuracy and atomic JSON writes."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dlion.core.errors import DataError
from dlion.core.files import write_atomic


@dataclass(frozen=True)
class EvalPoint:
    """One periodic evaluation of all replicas at virtual time `t` (seconds)."""

    t: float
    iteration: int
    mean_acc: float
    min_acc: float
    mean_loss: float
    bytes_sent: int


class MetricsLog:
    """Appends one JSON object per line to DIR/metrics.jsonl, flushed after each write."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.events: list[dict] = []
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Append so that a resumed run keeps the history written before it stopped.
            self._file = path.open("a", encoding="utf-8")

    def write(self, event: str, **fields: object) -> None:
        """Record `{"event": event, **fields}` in memory and, if a path was given, on disk."""
        record: dict = finite_json({"event": event, **fields})
        # Serialize before keeping it so that a bad field never leaves memory and disk out of sync.
        line = json.dumps(record, allow_nan=False)
        self.events.append(record)
        if self._file is not None:
            self._file.write(line + "\n")
            # Flush every line so a crashed or still-running run can be inspected from outside.
            self._file.flush()

    def continue_file(self, path: Path, offset: int) -> None:
        """Resume: cut `path` back to its first `offset` bytes (the history up to a
        checkpoint, which the caller has verified) and append further events to it."""
        self.close()
        with path.open("r+b") as f:
            f.truncate(offset)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def close(self) -> None:
        """Close the file; further writes only go to memory."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reached_target(value: float, target: float, higher_is_better: bool = True) -> bool:
    """Whether a metric value has reached the target in the metric's direction."""
    return value >= target if higher_is_better else value <= target


def worst(values: Sequence[float], higher_is_better: bool = True) -> float:
    """The worst replica's value: the lowest accuracy, or the highest loss."""
    return min(values) if higher_is_better else max(values)


def time_to_accuracy(
    points: Sequence[EvalPoint], target: float, higher_is_better: bool = True
) -> float | None:
    """First eval time at which the mean metric reaches target (>= for a higher-is-better
    metric such as accuracy, <= for a loss), or None if it never gets there."""
    reached = [p.t for p in points if reached_target(p.mean_acc, target, higher_is_better)]
    # min() rather than the first element, so unsorted input still gives the earliest crossing.
    return min(reached) if reached else None


def run_summary(
    points: Sequence[EvalPoint],
    *,
    scenario: str,
    strategy: str,
    seed: int,
    engine: str,
    target_acc: float,
    metric: str = "accuracy",
    higher_is_better: bool = True,
) -> dict[str, object]:
    """The fields every run's summary.json has (DESIGN.md's contract), from its eval points;
    engines add their own after these."""
    last = points[-1]
    diverged = not all(math.isfinite(x) for x in (last.mean_loss, last.mean_acc, last.min_acc))
    return {
        "scenario": scenario,
        "strategy": strategy,
        "seed": seed,
        "engine": engine,
        "target_acc": target_acc,
        "tta_s": time_to_accuracy(points, target_acc, higher_is_better),
        "final_acc": last.mean_acc,
        "final_loss": last.mean_loss,
        "time_s": last.t,
        "bytes_sent": last.bytes_sent,
        "final_min_acc": last.min_acc,
        "iterations": last.iteration,
        # `*_acc` fields hold the value of this metric (accuracy unless configured).
        "metric": metric,
        "higher_is_better": higher_is_better,
        # A non-finite loss (NaN, inf) means training blew up; strict JSON writes it as null.
        "diverged": diverged,
    }


def warn_diverged(summaries: Sequence[dict[str, Any]]) -> None:
    """One line on stderr if any run diverged (its loss became NaN or inf; summary.json
    marks it `"diverged": true`)."""
    diverged = [s for s in summaries if s.get("diverged")]
    if diverged:
        names = ", ".join(f"{s['scenario']} {s['strategy']} seed {s['seed']}" for s in diverged)
        print(
            f"warning: {len(diverged)} run(s) diverged (non-finite loss; a lower train.lr "
            f"may help): {names}",
            file=sys.stderr,
        )


def finite_json(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf) replaced by None, so that it is strict
    JSON: such a value means "no number" (a diverged loss), which JSON spells null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: object) -> None:
    """Write `obj` as indented JSON; readers see the old file or the new one, never half of one."""
    # Serialize first: an unserializable object then fails before anything touches the disk.
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_metrics(path: Path) -> list[dict]:
    """Parse a metrics.jsonl file into its event dicts; blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read metrics file {path}: {e}") from e
    events: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: malformed JSON: {e.msg}") from e
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object")
        events.append(record)
    return events
