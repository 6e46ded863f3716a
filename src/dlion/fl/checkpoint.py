"""Server checkpoints: tensors in safetensors (no pickle), metadata in JSON, written atomically.

A checkpoint is a pair ckpt-NNNNNN.safetensors + ckpt-NNNNNN.json in DIR/checkpoint. The
JSON is written last (temp file + rename) and names the tensors file and its SHA-256, so
a crash mid-write leaves the previous pair as the latest complete one. Loading refuses,
with one line and before anything is written, a checkpoint that is truncated or
tampered with (hash, header, shapes), or that belongs to another config or algorithm.
What is restored: the global model, its version, the virtual time, the algorithm's state
(FedASMU's per-device parameters, FedBuff's buffer), the norm screen and the counters
(server counters, bytes sent, departures).
Tasks in flight at checkpoint time are lost, as they would be if the server restarted:
their clients check in again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dlion.errors import BadInput
from dlion.fl.base import Algorithm, ServerState
from dlion.fl.config import FLConfig, config_hash
from dlion.fl.roles import Server
from dlion.report import write_json_atomic

FORMAT = "dlion-fl-checkpoint/1"


class CheckpointError(BadInput):
    """A checkpoint cannot be used: the message names the file and the reason."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    folder: Path,
    cfg: FLConfig,
    t: float,
    state: ServerState,
    algo: Algorithm,
    server: Server,
    totals: dict[str, int] | None = None,
) -> Path:
    """Write one checkpoint and keep the newest `checkpoint.keep`; `totals` are run
    counters (bytes sent, departures) that a resumed run continues from."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("ckpt-*.json"))
    seq = int(existing[-1].stem.removeprefix("ckpt-")) + 1 if existing else 0
    name = f"ckpt-{seq:06d}"
    tensors = {"model": state.model.detach().clone()}
    tensors.update(
        {f"algo.{k}": v.detach().clone().contiguous() for k, v in algo.state_tensors().items()}
    )
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / f"{name}.safetensors")
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "config_hash": config_hash(cfg),
        "algorithm": cfg.algorithm.name,
        "time": t,
        "version": state.version,
        "numel": state.model.numel(),
        "tensors_file": f"{name}.safetensors",
        "tensors_sha256": _sha256(folder / f"{name}.safetensors"),
        "norm_history": list(server.norms.history),
        "stats": server.stats.as_dict(),
        **(totals or {}),
    }
    write_json_atomic(folder / f"{name}.json", meta)
    for old in sorted(folder.glob("ckpt-*.json"))[: -cfg.checkpoint.keep]:
        old.unlink(missing_ok=True)
        (folder / f"{old.stem}.safetensors").unlink(missing_ok=True)
    return folder / f"{name}.json"


@dataclass
class Restored:
    time: float
    version: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def apply(self, state: ServerState, algo: Algorithm, server: Server) -> None:
        state.model.copy_(self.tensors["model"])
        state.version = self.version
        algo_tensors = {
            k.removeprefix("algo."): v for k, v in self.tensors.items() if k.startswith("algo.")
        }
        try:
            algo.load_state_tensors(algo_tensors)
        except (KeyError, ValueError, IndexError) as exc:
            raise CheckpointError(f"checkpoint: algorithm state does not fit ({exc})") from None
        server.norms.history.extend(float(x) for x in self.meta.get("norm_history", []))
        stats = self.meta.get("stats", {})
        for key, value in stats.items():
            if key != "rejected_total" and hasattr(server.stats, key):
                setattr(server.stats, key, value)


def load_checkpoint(where: Path, cfg: FLConfig) -> Restored:
    """The latest complete checkpoint under `where` (a run directory or its checkpoint
    folder), checked against `cfg`; CheckpointError (one line) if it cannot be used."""
    folder = where / "checkpoint" if (where / "checkpoint").is_dir() else where
    if not folder.is_dir():
        raise CheckpointError(f"--resume {where}: no such run directory")
    candidates = sorted(folder.glob("ckpt-*.json"))
    if not candidates:
        raise CheckpointError(f"--resume {where}: no checkpoint found (ckpt-*.json)")
    path = candidates[-1]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a readable JSON checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dlion FL checkpoint (format {FORMAT})")
    if meta.get("config_hash") != config_hash(cfg):
        raise CheckpointError(
            f"{path}: written for another config (algorithm {meta.get('algorithm')!r}); "
            "resume with the config of that run"
        )
    tensors_name = meta.get("tensors_file")
    if not isinstance(tensors_name, str) or "/" in tensors_name or "\\" in tensors_name:
        raise CheckpointError(f"{path}: bad tensors_file entry")
    tensors_path = folder / tensors_name
    if not tensors_path.is_file():
        raise CheckpointError(f"{tensors_path}: tensors file missing")
    if _sha256(tensors_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensors_path}: truncated or modified (SHA-256 mismatch)")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensors_path}: unreadable safetensors ({exc})") from None
    model = tensors.get("model")
    numel = meta.get("numel")
    if model is None or model.dtype != torch.float32 or model.numel() != numel:
        raise CheckpointError(f"{tensors_path}: model tensor missing or of the wrong shape/dtype")
    if not bool(torch.isfinite(model).all()):
        raise CheckpointError(f"{tensors_path}: model contains NaN or Inf")
    t, version = meta.get("time"), meta.get("version")
    if not isinstance(t, int | float) or not isinstance(version, int) or t < 0 or version < 0:
        raise CheckpointError(f"{path}: bad time or version")
    if t >= cfg.train.max_time:
        raise CheckpointError(
            f"{path}: the run already reached t={t:g} s >= train.max_time={cfg.train.max_time:g}; "
            "raise train.max_time to continue it"
        )
    return Restored(float(t), version, tensors, meta)
