"""A rich progress bar over simulated time for one training run."""

from __future__ import annotations

import math
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

_MISSING = "—"


class TrainProgress:
    """Rich progress bar for one run: description, a bar over simulated time up to max_time,
    and live fields: simulated time (s), iteration, mean accuracy, best accuracy."""

    def __init__(
        self,
        description: str,
        max_time: float,
        *,
        enabled: bool = True,
        console: Console | None = None,
    ) -> None:
        self.description = description
        self.max_time = max_time
        self.enabled = enabled
        self.best_acc: float | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("t {task.fields[sim_time]}s"),
            TextColumn("it {task.fields[iteration]}"),
            TextColumn("acc {task.fields[acc]}"),
            TextColumn("best {task.fields[best]}"),
            console=console,
            transient=False,
        )
        # A non-positive horizon has no meaningful fraction; rich shows an indeterminate bar.
        total = max_time if max_time > 0 else None
        self._task = self._progress.add_task(
            description, total=total, sim_time="0.0", iteration=0, acc=_MISSING, best=_MISSING
        )

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, sim_time: float, iteration: int, acc: float | None) -> None:
        """Move the bar to `sim_time`; `acc` is None between evaluations."""
        if acc is not None and not math.isnan(acc):
            self.best_acc = acc if self.best_acc is None else max(self.best_acc, acc)
        if self._progress is None or self._task is None:
            return
        fields: dict[str, object] = {"sim_time": f"{sim_time:.1f}", "iteration": iteration}
        # Keep the last shown accuracy when this update carries none.
        if acc is not None:
            fields["acc"] = f"{acc:.4f}"
        if self.best_acc is not None:
            fields["best"] = f"{self.best_acc:.4f}"
        completed = min(sim_time, self.max_time) if self.max_time > 0 else sim_time
        self._progress.update(self._task, completed=completed, **fields)
