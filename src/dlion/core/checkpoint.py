"""Checkpoints: tensors in safetensors (never pickle), metadata in JSON, written atomically.

Layout under a checkpoint root (a run's DIR/checkpoints, or one dist worker's folder):

    ROOT/<step:08d>/tensors.safetensors   named tensors
    ROOT/<step:08d>/meta.json             format, config hash, step, the caller's state
                                          (JSON), the tensors file's size and SHA-256, and
                                          the SHA-256 of the metadata itself
    ROOT/latest                           the step directory to resume from

A step is written into a hidden temp directory (each file fsynced), renamed into place,
and only then named by `latest` (temp file + rename), so a crash at any point leaves the
previous checkpoint the latest complete one. The newest `keep` steps are kept.

Loading checks everything before the caller may write anything: format, the metadata's
own hash (an edited meta.json), the config hash (a checkpoint of another run), the
tensors file's size (truncation) and hash (any flipped byte), then the safetensors header
and tensors. Any failure is a CheckpointError, one line naming the file and the reason.
The module knows nothing of engines: the sim and the dist workers (and the FL server)
decide what goes into `tensors` and `state`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dlion.core.errors import BadInput
from dlion.core.files import write_atomic

FORMAT = "dlion-checkpoint/1"
TENSORS = "tensors.safetensors"
META = "meta.json"
LATEST = "latest"


class CheckpointError(BadInput):
    """A checkpoint cannot be used: the message names the file and the reason."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the step directory
    step: int
    state: dict[str, Any]  # the caller's JSON state
    tensors: dict[str, torch.Tensor]


def canonical_hash(obj: Any) -> str:
    """SHA-256 of `obj` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def config_hash(raw: Mapping[str, Any], drop: Iterable[str] = ()) -> str:
    """Identity of a run for its checkpoints: the hash of its config (a model_dump in JSON
    mode) without the dotted fields in `drop`, which a resumed run may change."""
    data = json.loads(json.dumps(raw))
    for dotted in drop:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return canonical_hash(data)


def file_sha256(path: Path, limit: int | None = None) -> str:
    """SHA-256 of a file (of its first `limit` bytes if given)."""
    h = hashlib.sha256()
    left = limit
    with path.open("rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _step_dirs(root: Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def save_checkpoint(
    root: Path,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    *,
    config_hash: str,
    keep: int = 2,
) -> Path:
    """Write step `step` under `root` atomically, make it the latest, keep the newest `keep`.
    Returns the step directory. Steps newer than `step` (left by a run that was resumed from
    an earlier checkpoint) are removed: they belong to a history that was abandoned."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
    # Serialize first: an unserializable state fails before anything touches the disk.
    body = {"format": FORMAT, "config_hash": config_hash, "step": step, "state": dict(state)}
    json.dumps(body, allow_nan=False)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # a writer that crashed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    name = f"{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
        save_file(flat, str(tmp / TENSORS))
        with (tmp / TENSORS).open("rb") as f:
            os.fsync(f.fileno())
        body["tensors_file"] = TENSORS
        body["tensors_bytes"] = (tmp / TENSORS).stat().st_size
        body["tensors_sha256"] = file_sha256(tmp / TENSORS)
        body["meta_sha256"] = canonical_hash(body)
        _write_file(tmp / META, (json.dumps(body, indent=1, allow_nan=False) + "\n").encode())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # the same step from an abandoned history: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _point_latest(root, name)
    steps = _step_dirs(root)
    doomed = [s for s in steps if s > step] + [s for s in steps if s <= step][:-keep]
    for s in doomed:
        shutil.rmtree(root / f"{s:08d}", ignore_errors=True)
    return final


def _point_latest(root: Path, name: str) -> None:
    write_atomic(root / LATEST, lambda tmp: tmp.write_text(name + "\n", encoding="utf-8"))
    _fsync_dir(root)


def latest_step_dir(root: Path) -> Path:
    """The step directory `root/latest` names; CheckpointError if there is none."""
    if not root.is_dir():
        raise CheckpointError(f"{root}: no checkpoint directory")
    pointer = root / LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CheckpointError(f"{root}: no checkpoint (missing {LATEST})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable ({exc})") from None
    if not (name.isdigit() and len(name) == 8):
        raise CheckpointError(f"{pointer}: does not name a step directory ({name[:40]!r})")
    return root / name


def load_latest(root: Path, config_hash: str, finite: Container[str] | None = None) -> Checkpoint:
    """The checkpoint `root/latest` names, fully verified (see load_checkpoint)."""
    return load_checkpoint(latest_step_dir(root), config_hash, finite)


def load_checkpoint(
    step_dir: Path, config_hash: str, finite: Container[str] | None = None
) -> Checkpoint:
    """Read and verify one step directory; CheckpointError (one line) if it cannot be used.
    Reads only: nothing on disk changes, whatever the outcome. `finite`: the tensors that
    may not hold NaN or Inf (default: every floating one; an algorithm's state may use
    Inf as "not known yet")."""
    meta_path = step_dir / META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{meta_path}: not readable JSON (truncated or damaged)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a dlion checkpoint (format {FORMAT})")
    claimed = meta.pop("meta_sha256", None)
    if claimed != canonical_hash(meta):
        raise CheckpointError(f"{meta_path}: metadata modified (SHA-256 mismatch)")
    if meta.get("config_hash") != config_hash:
        raise CheckpointError(
            f"{meta_path}: written for another config (config hash differs); "
            "resume with the config of that run"
        )
    step, state = meta.get("step"), meta.get("state")
    if not isinstance(step, int) or not isinstance(state, dict):
        raise CheckpointError(f"{meta_path}: bad step or state entry")
    tensors_path = step_dir / TENSORS
    try:
        size = tensors_path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{tensors_path}: missing") from None
    if size != meta.get("tensors_bytes"):
        raise CheckpointError(
            f"{tensors_path}: truncated or extended ({size} bytes, "
            f"expected {meta.get('tensors_bytes')})"
        )
    if file_sha256(tensors_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensors_path}: modified (SHA-256 mismatch)")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensors_path}: unreadable safetensors ({exc})") from None
    for key, value in tensors.items():
        checked = finite is None or key in finite
        if checked and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{tensors_path}: tensor {key!r} contains NaN or Inf")
    return Checkpoint(step_dir, step, state, tensors)
