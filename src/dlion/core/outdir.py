"""Output directories: one policy for every command that writes a run, a bench or a report.

The rules (README, "Output directories"):
1. A command writes into a new or empty directory. A directory holding an earlier dlion
   output is refused with one line unless `--force` is given; a directory holding anything
   dlion did not write (the user's config, notes, another program's files) is refused
   even with `--force`: dlion never deletes or overwrites what is not its own.
2. With `--force` over an earlier output, the new output is written to a temporary
   directory beside it and swapped in only when complete; if it is interrupted or fails,
   the temporary directory is removed and the earlier output stays as it was (never half
   replaced).
3. In a new or empty directory the output is written in place; if it is interrupted or
   fails, its summary.json says `"status": "partial"` (created if the command had not
   written one yet), so a partial run never passes for a finished one.
4. Benches continue their own directory (`reuse=True`): finished runs that match are
   reused, and the command itself decides, per run, what `--force` may replace.
5. An unusable path (a file, a path under a file, no write permission) is one line,
   exit 2, before any work. Default directory names are built with `default_dir`, which
   keeps them inside `runs/` whatever the config's name says.

A marker file, `.dlion-output.json`, says that a directory is a dlion output: the command
that wrote it, its status (running, complete, partial) and the entries it wrote, so that a
file the user adds later is recognised as theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dlion.core.errors import BadInput

MARKER = ".dlion-output.json"
RUNS = Path("runs")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]")


def safe_name(text: str) -> str:
    """`text` as one directory name: no separators, no leading dot (so `../x` stays a
    child), only portable characters."""
    return _UNSAFE.sub("_", text).lstrip(".") or "run"


def default_dir(*parts: object) -> Path:
    """runs/PART1-PART2-...: a default output directory that stays inside runs/."""
    return RUNS / safe_name("-".join(str(p) for p in parts))


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a dlion output directory, or None if `path` is not one."""
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_marker(path: Path, command: str, status: str, entries: list[str] | None) -> None:
    data = {"command": command, "status": status, "entries": entries}
    tmp = path / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path / MARKER)


def foreign_entries(path: Path) -> list[str]:
    """Entries of directory `path` that dlion did not write (all of them without a marker;
    for a run killed before it recorded its entries, none)."""
    names = sorted(p.name for p in path.iterdir() if p.name != MARKER)
    marker = read_marker(path)
    if marker is None:
        return names
    ours = marker.get("entries")
    if not isinstance(ours, list):
        return []
    return [n for n in names if n not in ours]


def _check_usable(path: Path, option: str) -> None:
    """One line naming the problem if `path` cannot be an output directory."""
    if path.exists() and not path.is_dir():
        raise BadInput(f"{option} {path}: is a file, not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise BadInput(f"{option} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {path}: no permission to write in {probe}")
    if path.is_dir() and not os.access(path, os.R_OK):
        raise BadInput(f"{option} {path}: no permission to read it")


@dataclass
class OutputDir:
    """Where a command's output goes. `work` is where to write (the directory itself, or a
    temporary one beside it when replacing an earlier output); `path` is where it ends up."""

    path: Path
    work: Path
    command: str
    staged: bool
    # Set by a command that ends on purpose before its run is over (`--stop-at`): the
    # output is kept, marked partial with this reason.
    partial_reason: str | None = None

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """Yield the directory to write into; finish it as complete, or as partial (in
        place) or discarded (staged) if the body raises, an interrupt included. Bad input
        found on the way (a refused resume, a data file) leaves nothing behind: a directory
        that held an output is as it was, a new one is removed."""
        existed = self.work.is_dir()
        held = existed and any(self.work.iterdir())
        marker = self.work / MARKER
        before = marker.read_bytes() if marker.is_file() else None
        self.work.mkdir(parents=True, exist_ok=True)
        _write_marker(self.work, self.command, "running", None)
        try:
            yield self.work
        except BadInput:
            if self.staged or not existed:
                shutil.rmtree(self.work, ignore_errors=True)
            elif not held:
                for child in list(self.work.iterdir()):
                    _remove(child)
            elif before is None:
                marker.unlink(missing_ok=True)
            else:
                marker.write_bytes(before)
            raise
        except BaseException as exc:
            self._abandon(exc)
            raise
        self._finish()

    def _entries(self) -> list[str]:
        return sorted(p.name for p in self.work.iterdir() if p.name != MARKER)

    def _finish(self) -> None:
        status = "complete"
        if self.partial_reason is not None:
            mark_partial(self.work / "summary.json", self.partial_reason)
            status = "partial"
        _write_marker(self.work, self.command, status, self._entries())
        if not self.staged:
            return
        old = self.path.parent / f".{self.path.name}.dlion-old-{os.getpid()}"
        os.rename(self.path, old)
        os.rename(self.work, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def _abandon(self, exc: BaseException) -> None:
        if self.staged:
            shutil.rmtree(self.work, ignore_errors=True)
            exc.add_note(f"{self.path} left as it was (the new output was not kept)")
            return
        with contextlib.suppress(OSError):
            mark_partial(self.work / "summary.json", _reason(exc))
            _write_marker(self.work, self.command, "partial", self._entries())
            exc.add_note(f"{self.path} holds a partial output (summary.json says so)")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted ({str(exc) or 'SIGINT'})"
    return f"failed: {type(exc).__name__}"


def mark_partial(summary: Path, reason: str) -> None:
    """Say in `summary` (created if missing) that the output is partial, and why."""
    from dlion.report import write_json_atomic

    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(summary.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            data = loaded
    data["status"] = "partial"
    data["partial_reason"] = reason
    write_json_atomic(summary, data)


def open_output(
    path: Path,
    *,
    command: str,
    force: bool = False,
    reuse: bool = False,
    option: str = "--out",
) -> OutputDir:
    """Check `path` against the policy (module docstring) before any work; BadInput with
    one line if it cannot be used. Nothing is created until `writing()`."""
    _check_usable(path, option)
    if not path.is_dir() or not any(path.iterdir()):
        return OutputDir(path, path, command, staged=False)
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise BadInput(
            f"{option} {path}: holds files dlion did not write ({shown}); "
            "choose a new or empty directory"
        )
    marker = read_marker(path) or {}
    if reuse and marker.get("command") == command:
        return OutputDir(path, path, command, staged=False)
    if not force:
        status = marker.get("status", "earlier")
        what = "a finished" if status == "complete" else f"a {status}"
        raise BadInput(
            f"{option} {path}: holds {what} `{marker.get('command', 'dlion')}` output; "
            "pass --force to replace it, or choose another directory"
        )
    parent = path.resolve().parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {path}: cannot replace it: no permission to write in {parent}")
    work = parent / f".{path.resolve().name}.dlion-tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    return OutputDir(path, work, command, staged=True)


def resume_output(path: Path, *, command: str, option: str = "--resume") -> OutputDir:
    """A run directory to continue in place: it must exist and be writable throughout
    (metrics, summary, checkpoints), checked before anything in it changes."""
    if not path.is_dir():
        raise BadInput(f"{option} {path}: no such run directory")
    for sub in (path, *path.rglob("*")):
        if not os.access(sub, os.W_OK | (os.X_OK if sub.is_dir() else 0)):
            raise BadInput(f"{option} {path}: no permission to write {sub}")
    return OutputDir(path, path, command, staged=False)


def same_config(run_dir: Path, wanted: dict[str, Any], force: bool) -> bool:
    """For a bench: whether the finished run in run_dir was made with exactly the resolved
    config `wanted` (its config.yaml), so that it may be reused. A finished run of another
    config is BadInput naming the first difference, unless `force` (then False: rerun)."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        saved = None
    if saved == wanted:
        return True
    if force:
        return False
    where = first_difference(saved, wanted) if isinstance(saved, dict) else "config.yaml"
    raise BadInput(
        f"{run_dir}: holds a finished run of another config (differs at {where}); "
        "pass --force to rerun it, or choose another --out"
    )


def first_difference(a: Any, b: Any, path: str = "", whole: str = "config") -> str:
    """Dotted path of the first place where two JSON-like values differ ("" if equal,
    `whole` if they differ as a whole)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}.{key}".lstrip(".")
            found = first_difference(a[key], b[key], f"{path}.{key}", whole)
            if found:
                return found
        return ""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{path}[{i}]", whole)
            if found:
                return found
        return ""
    return "" if a == b else path.lstrip(".") or whole


def check_output_file(path: Path, *, force: bool = False, option: str = "--out") -> None:
    """The policy for a command that writes one file: an existing file is replaced only with
    `force` (never a directory), and the file's directory must be usable; BadInput with one
    line otherwise, before any work. Callers write the file atomically (write_json_atomic,
    or a temporary file renamed over it)."""
    if path.is_dir():
        raise BadInput(f"{option} {path}: is a directory, not a file")
    if path.exists() and not force:
        raise BadInput(f"{option} {path}: exists; pass --force to replace it")
    _check_usable(path.parent if str(path.parent) else Path("."), option)
