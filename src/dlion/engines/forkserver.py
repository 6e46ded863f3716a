"""Start dist worker processes from a fork server that has already imported torch.

Where the start-up time of `dlion train --engine dist` went (6 workers, 2-core host,
measured in benchmarks/RESULTS.md section 13): each `python -m dlion.jobs.dist_worker` imported
torch (~2.3 s of CPU), scikit-learn and scipy for the digits loader (~1.5 s), then
counted the model's FLOPs, whose first use imports torch._dynamo (~1.9 s): about 6 s of
CPU per worker, 36 s for six on two cores, before any of them registered. Here one
process (multiprocessing's fork server, started fresh, so no threads or locks of the
launcher leak into the children) imports all of that once, while the launcher prepares
its own copy of the data; each worker is then a fork of it that starts in milliseconds.

A forked worker runs exactly what `python -m dlion.jobs.dist_worker` runs (same argv, the
launcher's environment and working directory at the time of the spawn, its output to
its log file), and is handled through the Popen methods the launcher uses.
`DLION_FORKSERVER=0` falls back to one `python -m dlion.jobs.dist_worker` per worker.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from multiprocessing.process import BaseProcess
from pathlib import Path

# What a worker imports before it registers; loaded once in the fork server. torch._dynamo
# is what torch.utils.flop_counter pulls in on first use (the FLOP count of the model).
PRELOAD = ["dlion.jobs.dist_worker", "dlion.engines.dist", "dlion.strategies", "torch._dynamo"]


def enabled() -> bool:
    return os.environ.get("DLION_FORKSERVER", "1") != "0"


def _context() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def warm_up() -> None:
    """Start the fork server now (its imports run while the caller does other work)."""
    if enabled():
        from multiprocessing import forkserver

        _context()
        forkserver.ensure_running()


class ForkedWorker:
    """A worker forked by the fork server, with the subset of subprocess.Popen's interface
    the launcher uses. `returncode` follows Popen: negative for a signal."""

    def __init__(self, process: BaseProcess) -> None:
        if process.pid is None:
            raise ValueError("ForkedWorker: the process has not been started")
        self._process = process
        self.pid: int = process.pid
        self.args = process.name

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_worker(argv: list[str], env: Mapping[str, str], log_path: Path) -> ForkedWorker:
    """Start `python -m dlion.jobs.dist_worker ARGV` as a fork of the fork server."""
    ctx = _context()
    process = ctx.Process(
        target=_child,
        args=(list(argv), dict(env), os.getcwd(), str(log_path)),
        name=f"dlion.jobs.dist_worker {' '.join(argv)}",
        daemon=False,
    )
    process.start()
    return ForkedWorker(process)


def _child(argv: list[str], env: dict[str, str], cwd: str, log_path: str) -> None:
    """In the forked process: become `python -m dlion.jobs.dist_worker` (never returns)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # PYTHONPATH as the launcher has it now (the fork server read it when it started).
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = ["dlion.jobs.dist_worker", *argv]
    try:
        # By name: the worker module is the launcher's caller's business, not an engine's.
        importlib.import_module("dlion.jobs.dist_worker").main()
    finally:
        os._exit(1)  # dlion.jobs.dist_worker exits itself; reaching here is a failure
