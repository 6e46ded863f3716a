"""Rich progress bars for the stages of transfer runs (or nothing at all with --quiet)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class Stages:
    """One bar per stage. With `transient`, a stage's bar disappears when the stage ends
    (a benchmark runs dozens of stages and shows only the current run's)."""

    def __init__(
        self, *, enabled: bool = True, transient: bool = False, console: Console | None = None
    ) -> None:
        self.transient = transient
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                console=console,
            )

    def __enter__(self) -> Stages:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[StageBar]:
        """A bar for one stage; `bar.tick()` advances it by one step."""
        if self._progress is None:
            yield StageBar(None, None, total)
            return
        task = self._progress.add_task(description, total=total, note="")
        try:
            yield StageBar(self._progress, task, total)
        finally:
            if self.transient:
                self._progress.remove_task(task)


class StageBar:
    """Handle on one stage's bar; every method is a no-op when progress is off."""

    def __init__(self, progress: Progress | None, task: TaskID | None, total: int) -> None:
        self._progress = progress
        self._task = task
        self._total = total

    def tick(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, 1)

    def note(self, text: str) -> None:
        """Short live text next to the bar (e.g. the validation MSE)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, note=text)

    def finish(self) -> None:
        """Fill the bar (a stage that stopped early did fewer steps than its total)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self._total)
