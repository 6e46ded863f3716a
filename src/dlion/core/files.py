"""Writing one file so that a reader never sees half of it (no dlion imports: every layer
uses it)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a temp file beside `path` (the same directory, for os.replace to
    be an atomic rename), fsync it, then rename it over `path`: readers see the old file or
    the new one, and a crash mid-write leaves the old one. The temp file goes on failure."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
