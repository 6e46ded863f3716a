"""Saved runs of the RecycleML pipeline (EdgeSys '18): safetensors weights + JSON metadata.

Weights never go through pickle; every file is written to a temp file and renamed, so a crash
mid-write leaves the previous file intact. Loading checks every tensor against the model that
meta.json describes and refuses a mismatch with one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dlion.core.errors import DataError
from dlion.core.files import write_atomic
from dlion.report import write_json_atomic
from dlion.transfer.config import TransferConfig
from dlion.transfer.encoders import (
    Classifier,
    build_encoder,
    build_head,
    few_label_hidden,
    input_stats,
)

SOURCE_WEIGHTS = "source_model.safetensors"
TARGET_WEIGHTS = "target_encoder.safetensors"
HEAD_WEIGHTS = "few_label_heads.safetensors"
META = "meta.json"


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """safetensors (no pickle), written atomically (a crash mid-write leaves the previous file)."""
    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def write_run(
    out_dir: Path,
    cfg: TransferConfig,
    source: Classifier,
    target_encoder: nn.Module,
    heads: dict[str, torch.Tensor],
    source_shape: tuple[int, ...],
    target_shape: tuple[int, ...],
) -> None:
    """The source model, the transferred target encoder, the few-label heads (keys `k<k>.`)
    and meta.json with the config and input shapes needed to rebuild them."""
    last = source.head[-1] if isinstance(source.head, nn.Sequential) else None
    if not isinstance(last, nn.Linear):
        raise TypeError("write_run: the source head must end in an nn.Linear (build_head)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = {"format": "dlion-transfer", "source": cfg.data.source, "target": cfg.data.target}
    _save_tensors(out_dir / SOURCE_WEIGHTS, source.state_dict(), tag)
    _save_tensors(out_dir / TARGET_WEIGHTS, target_encoder.state_dict(), tag)
    _save_tensors(out_dir / HEAD_WEIGHTS, heads, tag)
    meta = {
        "format": "dlion-transfer",
        "version": 1,
        "config": cfg.model_dump(mode="json"),
        "source_shape": list(source_shape),
        "target_shape": list(target_shape),
        "num_classes": int(last.out_features),
        "files": [SOURCE_WEIGHTS, TARGET_WEIGHTS, HEAD_WEIGHTS],
    }
    write_json_atomic(out_dir / META, meta)


def _load_state(path: Path, module: nn.Module, prefix: str = "") -> None:
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{path}: not a readable safetensors file: {exc}") from None
    if prefix:
        tensors = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise DataError(f"{path}: no tensors for {prefix.rstrip('.')}")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataError(f"{path}: weights do not match the model in {META}: {first}") from None


def load_target_classifier(run_dir: str | Path, k: int | None = None) -> Classifier:
    """The transferred target model of a run: encoder + source head (k None) or + the
    few-label head trained on k labels."""
    run_dir = Path(run_dir)
    meta_path = run_dir / META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        cfg = TransferConfig.model_validate(meta["config"])
        target_shape = tuple(int(s) for s in meta["target_shape"])
        num_classes = int(meta["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta_path}: not a transfer run's metadata: {exc}") from None
    # Placeholder statistics of the right shape; the saved buffers overwrite them.
    dummy = np.zeros((2, *target_shape), dtype=np.float32)
    encoder = build_encoder(target_shape, cfg.model, input_stats(dummy))
    _load_state(run_dir / TARGET_WEIGHTS, encoder)
    if k is None:
        head = build_head(cfg.model.latent_dim, cfg.model.head_hidden, num_classes)
        _load_state(run_dir / SOURCE_WEIGHTS, head, prefix="head.")
    else:
        if k not in cfg.labels.ks:
            raise DataError(f"{run_dir}: no few-label head for k={k} (ks: {cfg.labels.ks})")
        head = build_head(cfg.model.latent_dim, few_label_hidden(cfg), num_classes)
        _load_state(run_dir / HEAD_WEIGHTS, head, prefix=f"k{k}.")
    model = Classifier(encoder, head)
    model.eval()
    return model
