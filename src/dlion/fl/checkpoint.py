"""FL server checkpoints, on the shared checkpoint module (checkpoint.py): tensors in
safetensors (no pickle), metadata in JSON, one step directory per checkpoint written
atomically, the newest `checkpoint.keep` kept. Loading refuses, with one line and before
anything is written, a checkpoint that is truncated or tampered with (hashes, sizes,
shapes), or that belongs to another config or algorithm.
What is restored: the global model, its version, the virtual time, the algorithm's state
(FedASMU's per-device parameters, FedBuff's buffer), the norm screen and the counters
(server counters, bytes sent, departures).
Tasks in flight at checkpoint time are lost, as they would be if the server restarted:
their clients check in again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlion.core.checkpoint import CheckpointError, latest_step_dir, load_latest
from dlion.core.checkpoint import save_checkpoint as save_step
from dlion.fl.base import Algorithm, ServerState
from dlion.fl.config import FLConfig, config_hash
from dlion.fl.roles import Server


def save_checkpoint(
    folder: Path,
    cfg: FLConfig,
    t: float,
    state: ServerState,
    algo: Algorithm,
    server: Server,
    totals: dict[str, int] | None = None,
) -> Path:
    """Write one checkpoint (a step directory under `folder`) and keep the newest
    `checkpoint.keep`; `totals` are run counters (bytes sent, departures) that a resumed
    run continues from."""
    try:
        step = int(latest_step_dir(folder).name) + 1
    except CheckpointError:
        step = 0
    tensors = {"model": state.model}
    tensors.update({f"algo.{k}": v for k, v in algo.state_tensors().items()})
    meta = {
        "algorithm": cfg.algorithm.name,
        "time": t,
        "version": state.version,
        "numel": state.model.numel(),
        "norm_history": list(server.norms.history),
        "stats": server.stats.as_dict(),
        **(totals or {}),
    }
    return save_step(
        folder, step, tensors, meta, config_hash=config_hash(cfg), keep=cfg.checkpoint.keep
    )


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
    """The latest checkpoint under `where` (a run directory or its checkpoint folder),
    verified and checked against `cfg`; CheckpointError (one line) if it cannot be used."""
    folder = where / "checkpoint" if (where / "checkpoint").is_dir() else where
    if not folder.is_dir():
        raise CheckpointError(f"--resume {where}: no such run directory")
    ckpt = load_latest(folder, config_hash(cfg), finite={"model"})
    meta, path = ckpt.state, ckpt.path
    model = ckpt.tensors.get("model")
    if model is None or model.dtype != torch.float32 or model.numel() != meta.get("numel"):
        raise CheckpointError(f"{path}: model tensor missing or of the wrong shape/dtype")
    t, version = meta.get("time"), meta.get("version")
    if not isinstance(t, int | float) or not isinstance(version, int) or t < 0 or version < 0:
        raise CheckpointError(f"{path}: bad time or version")
    if t >= cfg.train.max_time:
        raise CheckpointError(
            f"{path}: the run already reached t={t:g} s >= train.max_time={cfg.train.max_time:g}; "
            "raise train.max_time to continue it"
        )
    return Restored(float(t), version, ckpt.tensors, meta)
