"""Progress of one training run: a start-up status, then a bar over (simulated) time.

On a terminal both redraw in place (rich). Without one (CI, a log file) the bar would
print only when it ends, so progress is a plain line every `LINE_EVERY_S` seconds instead.
"""

from __future__ import annotations

import math
import sys
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn

_MISSING = "—"
# Without a terminal: at most one progress line per this many wall seconds.
LINE_EVERY_S = 5.0


def _is_terminal(console: Console | None) -> bool:
    return (console or Console()).is_terminal


class StartupStatus:
    """What a dist job is doing before its first iteration. `update` replaces the current
    state (a spinner line on a terminal; off one, a line when the state has changed since
    the last line, at most every `every_s` seconds: call it as often as convenient);
    `note` prints a line that stays (a worker that died, ready)."""

    def __init__(
        self, *, enabled: bool = True, console: Console | None = None, every_s: float = 2.0
    ) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=False)
        self.every_s = every_s
        self._status = None
        self._last_line = 0.0
        self._shown: str | None = None  # the last state printed as a line
        if enabled and self.console.is_terminal:
            self._status = self.console.status("starting")
            self._status.start()

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self._status is not None:
            self._status.update(text)
            return
        if text != self._shown and time.monotonic() - self._last_line >= self.every_s:
            self._shown = text
            self._emit(text)

    def note(self, text: str) -> None:
        if self.enabled:
            self._emit(text)

    def _emit(self, text: str) -> None:
        self._last_line = time.monotonic()
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        if self._status is None:
            sys.stdout.flush()

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __enter__(self) -> StartupStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainProgress:
    """Rich progress bar for one run: description, a bar over simulated time up to max_time,
    and live fields: simulated time (s), iteration, mean accuracy, best accuracy. Without a
    terminal: a plain line every `line_every_s` wall seconds (and one at the end)."""

    def __init__(
        self,
        description: str,
        max_time: float,
        *,
        enabled: bool = True,
        console: Console | None = None,
        line_every_s: float = LINE_EVERY_S,
    ) -> None:
        self.description = description
        self.max_time = max_time
        self.enabled = enabled
        self.best_acc: float | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._console = console
        self._lines = enabled and not _is_terminal(console)
        self._line_every_s = line_every_s
        self._last_line = time.monotonic()
        self._last: tuple[float, int, float | None] | None = None
        if not enabled or self._lines:
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
            escape(description),  # "[dist]" is text, not rich markup
            total=total,
            sim_time="0.0",
            iteration=0,
            acc=_MISSING,
            best=_MISSING,
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
        if self._lines and self._last is not None and exc_type is None:
            self._print_line(*self._last)

    def update(self, sim_time: float, iteration: int, acc: float | None) -> None:
        """Move the bar to `sim_time`; `acc` is None between evaluations."""
        if acc is not None and not math.isnan(acc):
            self.best_acc = acc if self.best_acc is None else max(self.best_acc, acc)
        if self._lines:
            shown = acc if acc is not None else (self._last[2] if self._last else None)
            self._last = (sim_time, iteration, shown)
            if time.monotonic() - self._last_line >= self._line_every_s:
                self._print_line(sim_time, iteration, shown)
            return
        if self._progress is None or self._task is None:
            return
        # Any: the type of rich's own `**fields` (what a Rich column may show).
        fields: dict[str, Any] = {"sim_time": f"{sim_time:.1f}", "iteration": iteration}
        # Keep the last shown accuracy when this update carries none.
        if acc is not None:
            fields["acc"] = f"{acc:.4f}"
        if self.best_acc is not None:
            fields["best"] = f"{self.best_acc:.4f}"
        completed = min(sim_time, self.max_time) if self.max_time > 0 else sim_time
        self._progress.update(self._task, completed=completed, **fields)

    def _print_line(self, sim_time: float, iteration: int, acc: float | None) -> None:
        self._last_line = time.monotonic()
        horizon = f"/{self.max_time:g}" if self.max_time > 0 else ""
        text = f"{self.description}: t {sim_time:.1f}{horizon} s, it {iteration}"
        if acc is not None:
            text += f", acc {acc:.4f}"
        if self.best_acc is not None:
            text += f", best {self.best_acc:.4f}"
        console = self._console or Console()
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        sys.stdout.flush()
