"""A worker that dies during start-up, for tests/test_startup.py: a dist worker imports this
module through DLION_PLUGINS (tests/ on PYTHONPATH) and SIGKILLs itself, either at once
(DLION_TEST_DIE=import: before it registers) or right after it has registered in the job's
store (DLION_TEST_DIE=registered: when its peers are about to connect to it)."""

from __future__ import annotations

import os
import signal

from dlion.engines.dist import DistWorker


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _register_then_die(self: DistWorker) -> None:
    _original_register(self)
    _die()


_original_register = DistWorker.register

if os.environ.get("DLION_TEST_DIE") == "import":
    _die()
elif os.environ.get("DLION_TEST_DIE") == "registered":
    DistWorker.register = _register_then_die  # type: ignore[method-assign]
