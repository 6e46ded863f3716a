"""The trained model: which replica is saved, `DIR/model.safetensors`, and loading it back.

The file holds the model's own `state_dict` (its parameter and buffer names, no pickle)
and, in the safetensors metadata, what rebuilds it: the model section of the config, the
input shape and class count, and which replica was saved with its final metric. So
`load_model(DIR)` returns the `nn.Module` without the run's config, provided a user's
builder ("pkg.module:fn") is importable where it is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dlion.core.config import ExperimentConfig
from dlion.core.errors import BadInput
from dlion.core.files import write_atomic
from dlion.training.models import build_model

MODEL_FILE = "model.safetensors"
_META_KEY = "dlion"


class ModelFileError(BadInput):
    """A model file is missing, truncated, or does not fit the model it describes."""


@dataclass(frozen=True)
class SavedModel:
    replica: str  # "best (rank 2)", "rank0 (rank 0)", "average of ranks [0, 1, 2]"
    metric: float
    loss: float

    def summary(self) -> dict[str, Any]:
        return {
            "file": MODEL_FILE,
            "replica": self.replica,
            "metric": self.metric,
            "loss": self.loss,
        }


def model_spec(
    cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int | None
) -> dict[str, Any]:
    """What `build_model` needs to rebuild the run's model."""
    m = cfg.model
    return {
        "name": m.name,
        "hidden": list(m.hidden),
        "channels": list(m.channels),
        "options": m.options,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "seed": cfg.train.seed,
    }


def choose_state(
    choice: str,
    states: Sequence[tuple[int, torch.Tensor]],
    results: Sequence[tuple[float, float]],
    higher_is_better: bool,
    evaluate: Callable[[torch.Tensor], tuple[float, float]],
) -> tuple[torch.Tensor, SavedModel]:
    """The model-state vector to save, from the live replicas' (rank, state) in rank order
    and their final (metric, loss): `best` metric (ties to the lowest rank), `rank0` (the
    lowest live rank) or the `average` (evaluated here with `evaluate`)."""
    if not states:
        raise ValueError("no live replica to save")
    if choice == "average":
        mean = torch.stack([s for _, s in states]).mean(dim=0)
        metric, loss = evaluate(mean)
        return mean, SavedModel(f"average of ranks {[r for r, _ in states]}", metric, loss)
    if choice == "rank0":
        index = 0
    else:
        sign = 1.0 if higher_is_better else -1.0
        index = max(range(len(states)), key=lambda i: (sign * results[i][0], -i))
    rank, state = states[index]
    metric, loss = results[index]
    return state.clone(), SavedModel(f"{choice} (rank {rank})", metric, loss)


def save_model(out_dir: Path, model: nn.Module, spec: dict[str, Any], saved: SavedModel) -> Path:
    """Write `model`'s state_dict and `spec` to out_dir/model.safetensors atomically."""
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {_META_KEY: json.dumps({"model": spec, "saved": saved.summary()})}
    path = out_dir / MODEL_FILE
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, dlion metadata) of a model file or of DIR/model.safetensors."""
    file = Path(path)
    if file.is_dir():
        file = file / MODEL_FILE
    if not file.is_file():
        raise ModelFileError(f"{file}: no model file (runs write DIR/{MODEL_FILE})")
    try:
        tensors = load_file(str(file))
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{file}: not a readable safetensors file ({exc})") from None
    if raw is None:
        raise ModelFileError(f"{file}: no dlion metadata (not written by dlion)")
    try:
        meta = json.loads(raw)
        meta["model"]["name"]
    except (ValueError, KeyError, TypeError):
        raise ModelFileError(f"{file}: its dlion metadata is malformed") from None
    return tensors, meta


def load_model(path: str | Path) -> nn.Module:
    """The trained model of a run directory (or a model file), in eval mode."""
    tensors, meta = read_model_file(path)
    spec = meta["model"]
    model = build_model(
        spec["name"],
        tuple(spec["input_shape"]),
        spec["num_classes"] if spec["num_classes"] is not None else 1,
        hidden=spec["hidden"],
        channels=spec["channels"],
        seed=int(spec["seed"]),
        options=spec["options"],
    )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise ModelFileError(f"{path}: the weights do not fit the model ({first})") from None
    return model.eval()
