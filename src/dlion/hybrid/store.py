"""Saved selective-query runs (Kag et al., ICLR '23): edge, router and cloud weights as
safetensors (never pickle), calibration and metadata as JSON, the config as YAML; loading
validates every file and refuses a truncated, tampered or mismatched one with one line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dlion.core.checkpoint import file_sha256
from dlion.core.errors import BadInput
from dlion.core.files import write_atomic
from dlion.hybrid.calibrate import Calibration
from dlion.hybrid.config import HybridConfig, config_hash, load_hybrid_config
from dlion.hybrid.gain import gain_feature_dim
from dlion.hybrid.inference import HybridModels
from dlion.hybrid.knn import KnnRouter
from dlion.hybrid.latency import LatencyModel
from dlion.hybrid.models import SplitModel, build_hybrid_model, feature_dim
from dlion.hybrid.router import Router
from dlion.hybrid.stacked import StackedRouter
from dlion.report import write_json_atomic

FORMAT = "dlion-hybrid/1"
WEIGHTS = ("edge", "router", "knn", "cloud")
CONFIG_FILE = "config.yaml"
CALIBRATION_FILE = "calibration.json"
RUN_FILE = "run.json"  # written last: its presence marks a complete run
FOLD_SEED = 1000  # cross-fitting fold f's models are initialised from cfg.seed + 1000 (f + 1)


@dataclass
class HybridRun:
    """Everything `eval` and `route` need: the config, models, calibration, latency model."""

    cfg: HybridConfig
    models: HybridModels
    calibration: Calibration
    latency: LatencyModel
    input_shape: tuple[int, ...]
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)  # training history, FLOPs, split sizes


def router_input_dim(edge: SplitModel, input_shape: tuple[int, ...], top_k: int) -> int:
    """Router input width: edge features + entropy + (top_k - 1) margins."""
    return feature_dim(edge, input_shape) + 1 + (top_k - 1)


def fold_seed_offsets(folds: int) -> list[int]:
    """Seed offset of each cross-fitting fold's models (fold f: FOLD_SEED * (f + 1))."""
    return [FOLD_SEED * (f + 1) for f in range(folds)]


def build_models(
    cfg: HybridConfig,
    input_shape: tuple[int, ...],
    num_classes: int,
    knn_size: int = 1,
    seed_offset: int = 0,
) -> HybridModels:
    """Freshly initialised edge, cloud, router and kNN memory (of `knn_size` rows) for this
    config and data shape; `seed_offset` gives cross-fitting models their own inits."""
    seed = cfg.seed + seed_offset
    edge = build_hybrid_model(cfg.edge, input_shape, num_classes, seed, "edge")
    cloud = build_hybrid_model(cfg.cloud, input_shape, num_classes, seed + 1, "cloud")
    gain_dim = gain_feature_dim(math.prod(input_shape), num_classes, cfg.router.top_k)
    router: Router | StackedRouter
    if cfg.router.design == "stacked":
        # Its ensemble: one edge per cross-fitting fold, initialised as train.py's fold models.
        fold_edges = [
            build_hybrid_model(cfg.edge, input_shape, num_classes, seed + offset, "edge")
            for offset in fold_seed_offsets(cfg.router.folds)
        ]
        router = StackedRouter(fold_edges, num_classes)
    elif cfg.router.design == "gain":
        router = Router(gain_dim, cfg.router.hidden, seed + 2, outputs=2)
    else:
        router = Router(
            router_input_dim(edge, input_shape, cfg.router.top_k), cfg.router.hidden, seed + 2
        )
    return HybridModels(
        edge=edge,
        cloud=cloud,
        router=router,
        knn=KnnRouter(gain_dim, knn_size),
        top_k=cfg.router.top_k,
        design=cfg.router.design,
    )


# ----------------------------------------------------------------------------- saving


def _module(models: HybridModels, role: str) -> nn.Module:
    return {
        "edge": models.edge,
        "router": models.router,
        "knn": models.knn,
        "cloud": models.cloud,
    }[role]


def save_run(run: HybridRun, run_dir: Path) -> None:
    """Write the run; run.json goes last, so a crash mid-save leaves no loadable half-run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).unlink(missing_ok=True)
    digest = config_hash(run.cfg)
    files: dict[str, str] = {}
    for role in WEIGHTS:
        path = run_dir / f"{role}.safetensors"
        state = {
            k: v.detach().contiguous() for k, v in _module(run.models, role).state_dict().items()
        }
        meta = {"format": FORMAT, "role": role, "config_hash": digest}
        write_atomic(path, partial(save_file, state, metadata=meta))
        files[path.name] = file_sha256(path)
    config_text = yaml.safe_dump(run.cfg.model_dump(mode="json"), sort_keys=False)
    write_atomic(run_dir / CONFIG_FILE, lambda tmp: tmp.write_text(config_text))
    write_json_atomic(run_dir / CALIBRATION_FILE, run.calibration.to_json())
    files[CALIBRATION_FILE] = file_sha256(run_dir / CALIBRATION_FILE)
    write_json_atomic(
        run_dir / RUN_FILE,
        {
            "format": FORMAT,
            "config_hash": digest,
            "input_shape": list(run.input_shape),
            "num_classes": run.num_classes,
            "knn_size": len(run.models.knn.memory),
            "latency": run.latency.to_dict(),
            "files": files,
            "info": run.info,
        },
    )


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise BadInput(f"{path}: missing; not a complete hybrid run (train it first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: unreadable or corrupt JSON ({exc})") from None


def _check_run_meta(meta: Any, path: Path) -> tuple[tuple[int, ...], int, int, LatencyModel]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadInput(f"{path}: not a {FORMAT} run file")
    try:
        shape = tuple(int(d) for d in meta["input_shape"])
        num_classes = int(meta["num_classes"])
        knn_size = int(meta["knn_size"])
        latency = LatencyModel(**{k: float(v) for k, v in meta["latency"].items()})
        files = meta["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("files must map names to checksums")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BadInput(f"{path}: malformed run metadata ({exc})") from None
    if not shape or min(shape) < 1 or num_classes < 2 or knn_size < 1:
        raise BadInput(
            f"{path}: malformed run metadata (input_shape {shape}, {num_classes} classes, "
            f"kNN memory {knn_size})"
        )
    return shape, num_classes, knn_size, latency


def _load_weights(module: nn.Module, path: Path, role: str, digest: str, checksum: str) -> None:
    """Load one safetensors file into `module`, or refuse it with one line naming the file."""
    if not path.is_file():
        raise BadInput(f"{path}: missing weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise BadInput(
            f"{path}: not a valid safetensors file (truncated or corrupt: {exc})"
        ) from None
    if meta.get("format") != FORMAT or meta.get("role") != role:
        raise BadInput(f"{path}: not {role} weights of a {FORMAT} run")
    if meta.get("config_hash") != digest:
        raise BadInput(
            f"{path}: weights belong to another run (config hash {meta.get('config_hash')}, "
            f"this run's is {digest})"
        )
    expected = module.state_dict()
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise BadInput(
            f"{path}: weights do not match the {role} model (missing {missing}, unexpected {extra})"
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape or tensor.dtype != expected[key].dtype:
            raise BadInput(
                f"{path}: {key} is {tensor.dtype} {tuple(tensor.shape)}, the {role} model "
                f"needs {expected[key].dtype} {tuple(expected[key].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BadInput(f"{path}: {key} holds NaN or Inf")
    if file_sha256(path) != checksum:
        raise BadInput(f"{path}: checksum mismatch with run.json (tampered or replaced)")
    module.load_state_dict(tensors, strict=True)


def load_run(run_dir: Path) -> HybridRun:
    """Load and validate a saved run; any problem is a BadInput naming the file."""
    if not run_dir.exists():
        raise BadInput(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: not a directory")
    meta_path = run_dir / RUN_FILE
    meta = _read_json(meta_path)
    input_shape, num_classes, knn_size, latency = _check_run_meta(meta, meta_path)
    cfg = load_hybrid_config(str(run_dir / CONFIG_FILE))
    digest = config_hash(cfg)
    if meta.get("config_hash") != digest:
        raise BadInput(
            f"{run_dir / CONFIG_FILE}: does not match {RUN_FILE} (edited after training?)"
        )
    files: dict[str, str] = meta["files"]
    models = build_models(cfg, input_shape, num_classes, knn_size)
    for role in WEIGHTS:
        name = f"{role}.safetensors"
        if name not in files:
            raise BadInput(f"{meta_path}: no checksum for {name}")
        _load_weights(_module(models, role), run_dir / name, role, digest, files[name])
    cal_path = run_dir / CALIBRATION_FILE
    calibration = Calibration.from_json(_read_json(cal_path), str(cal_path))
    if file_sha256(cal_path) != files.get(CALIBRATION_FILE):
        raise BadInput(f"{cal_path}: checksum mismatch with run.json (tampered or replaced)")
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    return HybridRun(cfg, models, calibration, latency, input_shape, num_classes, info)
