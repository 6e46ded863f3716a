"""Load the built-in and file-based datasets as float32/int64 tensors with a train/test split."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.model_selection import train_test_split

from dlion.core.errors import DataError
from dlion.core.files import write_atomic
from dlion.data.readers import CIFAR_NUM_CLASSES, read_cifar10_batch, read_idx, read_npz

__all__ = ["DATASET_NAMES", "Dataset", "cache_dir", "load_dataset"]

DATASET_NAMES = ("digits", "mnist1d", "synthetic", "mnist-idx", "cifar10", "npz")

_MNIST1D_MIN_SAMPLES = 10  # the generator makes num_samples // 10 samples of each of 10 digits
_SYNTHETIC_DEFAULT_SAMPLES = 4000
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Dataset:
    """A classification dataset split into train and test tensors."""

    name: str
    x_train: torch.Tensor  # float32, shape (n, *input_shape)
    y_train: torch.Tensor  # int64, shape (n,), labels 0..num_classes-1
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]  # per-sample shape
    num_classes: int


def load_dataset(
    name: str,
    *,
    path: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    num_samples: int | None = None,
    num_features: int = 32,
    num_classes: int = 10,
) -> Dataset:
    """Load dataset `name` (one of DATASET_NAMES).

    `path` is required by "mnist-idx", "cifar10" and "npz". `seed` drives generation and any
    split. `test_fraction` applies where this function makes the split ("digits", "synthetic",
    "npz" without x_test). `num_samples` sets how many samples "mnist1d" and "synthetic" generate
    and is ignored by the fixed datasets. `num_features` and `num_classes` apply to "synthetic".
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction: must be between 0 and 1 (exclusive), got {test_fraction}")
    if not _is_int(seed) or not 0 <= seed < 2**32:
        # numpy's legacy seeding (used by sklearn and mnist1d) accepts only this range.
        raise DataError(f"seed: must be an integer in [0, 2**32), got {seed!r}")
    if num_samples is not None and (not _is_int(num_samples) or num_samples < 1):
        raise DataError(f"num_samples: must be a positive integer, got {num_samples!r}")
    if name == "digits":
        return _load_digits(seed, test_fraction)
    if name == "mnist1d":
        return _load_mnist1d(seed, num_samples)
    if name == "synthetic":
        return _load_synthetic(seed, test_fraction, num_samples, num_features, num_classes)
    if path is None:
        raise DataError(f"data.path: dataset {name!r} needs a path (file or directory)")
    location = Path(path)
    if not location.exists():
        raise DataError(f"{location}: no such file or directory (dataset {name!r})")
    if name == "mnist-idx":
        return _load_mnist_idx(location)
    if name == "cifar10":
        return _load_cifar10(location)
    return _load_npz(location, seed, test_fraction)


def _is_int(value: object) -> bool:
    # bool is an Integral too, but True as a count or seed is a mistake.
    return isinstance(value, Integral) and not isinstance(value, bool)


def cache_dir() -> Path:
    """Directory for generated-data caches: $DLION_CACHE_DIR, else ~/.cache/dlion."""
    env = os.environ.get("DLION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dlion"


def _to_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
) -> Dataset:
    def features(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def targets(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    return Dataset(
        name=name,
        x_train=features(x_train),
        y_train=targets(y_train),
        x_test=features(x_test),
        y_test=targets(y_test),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        num_classes=int(num_classes),
    )


def _split(
    x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Stratify when every class can appear on both sides; otherwise fall back to a plain
    # seeded shuffle split, which is still deterministic.
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=test_fraction, random_state=seed, stratify=y
        )
    except ValueError:
        try:
            x_tr, x_te, y_tr, y_te = train_test_split(
                x, y, test_size=test_fraction, random_state=seed
            )
        except ValueError as exc:
            raise DataError(
                f"{where}: cannot split {len(y)} samples with test_fraction={test_fraction}: {exc}"
            ) from exc
    return x_tr, x_te, y_tr, y_te


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Statistics come from train only so the test set stays unseen.
    mean = x_train.mean(axis=0, keepdims=True)
    std = x_train.std(axis=0, keepdims=True)
    std = np.where(std > 1e-12, std, 1.0)  # constant features would divide by zero
    return (x_train - mean) / std, (x_test - mean) / std


def _load_digits(seed: int, test_fraction: float) -> Dataset:
    bunch = load_digits()
    x = (bunch.data / 16.0).reshape(-1, 1, 8, 8)  # pixels are 0..16
    y = bunch.target
    x_tr, x_te, y_tr, y_te = _split(x, y, seed, test_fraction, "digits")
    return _to_dataset("digits", x_tr, y_tr, x_te, y_te, 10)


@contextlib.contextmanager
def _preserve_global_rng() -> Iterator[None]:
    # mnist1d's generator reseeds the global `random` and `np.random` state; put it back so
    # loading data does not silently change randomness elsewhere in the process.
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _load_mnist1d(seed: int, num_samples: int | None) -> Dataset:
    # Imported here: the package pulls in matplotlib and requests, which other datasets never need.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    if num_samples is not None:
        if num_samples < _MNIST1D_MIN_SAMPLES:
            raise DataError(
                f"num_samples: mnist1d needs at least {_MNIST1D_MIN_SAMPLES}, got {num_samples}"
            )
        args.num_samples = num_samples
    key_args = dict(vars(args))
    key_args["mnist1d_version"] = importlib.metadata.version("mnist1d")
    key = hashlib.sha256(json.dumps(key_args, sort_keys=True).encode()).hexdigest()[:20]
    cache_file = cache_dir() / f"mnist1d-{key}.npz"

    arrays = _read_cache(cache_file)
    if arrays is None:
        with _preserve_global_rng():
            generated = make_dataset(args)
        arrays = {k: np.asarray(generated[k]) for k in ("x", "y", "x_test", "y_test")}
        _write_cache(cache_file, arrays)

    x_tr, x_te = _standardise(arrays["x"], arrays["x_test"])
    # Add a channel axis so 1-D conv models see (channels, length).
    x_tr = x_tr[:, None, :]
    x_te = x_te[:, None, :]
    return _to_dataset("mnist1d", x_tr, arrays["y"], x_te, arrays["y_test"], 10)


def _read_cache(cache_file: Path) -> dict[str, np.ndarray] | None:
    """Return the cached arrays, or None when the cache is missing or unusable."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x", "y", "x_test", "y_test")}
    except Exception:
        # A damaged cache is not the user's error: regenerate it.
        return None
    consistent = (
        arrays["x"].ndim == 2
        and arrays["x_test"].ndim == 2
        and len(arrays["x"]) == len(arrays["y"])
        and len(arrays["x_test"]) == len(arrays["y_test"])
        and np.isfinite(arrays["x"]).all()
    )
    return arrays if consistent else None


def _write_cache(cache_file: Path, arrays: dict[str, np.ndarray]) -> None:
    # Atomic, so a concurrent reader never sees a half-written cache. Caching is an
    # optimisation only: if the directory is not writable, carry on without it.
    def save(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a handle: np.savez would add .npz to a file name
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy stub: **arrays vs allow_pickle

    with contextlib.suppress(OSError):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, save)


def _load_synthetic(
    seed: int,
    test_fraction: float,
    num_samples: int | None,
    num_features: int,
    num_classes: int,
) -> Dataset:
    if not _is_int(num_classes) or num_classes < 2:
        raise DataError(f"num_classes: synthetic needs at least 2, got {num_classes!r}")
    if not _is_int(num_features) or num_features < 2:
        raise DataError(f"num_features: synthetic needs at least 2, got {num_features!r}")
    n = _SYNTHETIC_DEFAULT_SAMPLES if num_samples is None else num_samples
    if n < 2 * num_classes:
        raise DataError(
            f"num_samples: synthetic with {num_classes} classes needs at least "
            f"{2 * num_classes} samples, got {n}"
        )
    # Half the features carry signal and each class has two clusters, so a linear model gets
    # only about half right (10 classes, 32 features) while a small MLP reaches about 80%:
    # learnable, but not trivial.
    clusters = 2
    informative = max(2, num_features // 2)
    while 2**informative < num_classes * clusters and informative < num_features:
        informative += 1
    if 2**informative < num_classes * clusters:
        clusters = 1
    if 2**informative < num_classes * clusters:
        raise DataError(
            f"num_features: {num_features} features are too few for {num_classes} classes"
        )
    redundant = min(num_features - informative, num_features // 4)
    x, y = make_classification(
        n_samples=n,
        n_features=num_features,
        n_informative=informative,
        n_redundant=redundant,
        n_repeated=0,
        n_classes=num_classes,
        n_clusters_per_class=clusters,
        class_sep=1.5,
        flip_y=0.01,
        random_state=seed,
    )
    x_tr, x_te, y_tr, y_te = _split(x, y, seed, test_fraction, "synthetic")
    x_tr, x_te = _standardise(x_tr, x_te)
    return _to_dataset("synthetic", x_tr, y_tr, x_te, y_te, num_classes)


def _find_idx_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory / stem}: no such file (nor {stem}.gz) for dataset 'mnist-idx'")


def _load_mnist_idx(directory: Path) -> Dataset:
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (dataset 'mnist-idx')")
    files = {key: _find_idx_file(directory, stem) for key, stem in _IDX_FILES.items()}
    arrays = {key: read_idx(file) for key, file in files.items()}
    for split in ("train", "test"):
        images_file, labels_file = files[f"x_{split}"], files[f"y_{split}"]
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{images_file}: expected unsigned-byte images of shape (n, rows, cols), "
                f"found {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{labels_file}: expected a 1-D integer label array")
        if len(images) != len(labels):
            raise DataError(
                f"{images_file}: {len(images)} images but {labels_file} has {len(labels)} "
                f"labels; counts must match"
            )
        if len(labels) == 0:
            raise DataError(f"{labels_file}: no samples")
        if labels.min() < 0:
            raise DataError(f"{labels_file}: negative labels")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{files['x_test']}: images are {arrays['x_test'].shape[1:]} but train images are "
            f"{arrays['x_train'].shape[1:]}"
        )
    # Add the channel axis and scale bytes to [0, 1].
    x_tr = arrays["x_train"][:, None].astype(np.float32) / 255.0
    x_te = arrays["x_test"][:, None].astype(np.float32) / 255.0
    num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    return _to_dataset("mnist-idx", x_tr, arrays["y_train"], x_te, arrays["y_test"], num_classes)


def _load_cifar10(directory: Path) -> Dataset:
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (dataset 'cifar10')")
    for required in ("data_batch_1", "test_batch"):
        if not (directory / required).is_file():
            raise DataError(f"{directory / required}: no such file (dataset 'cifar10')")
    numbered = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := re.fullmatch(r"data_batch_(\d+)", p.name)) and p.is_file()
    ]
    train = [read_cifar10_batch(p) for _, p in sorted(numbered)]
    x_te, y_te = read_cifar10_batch(directory / "test_batch")
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    if len(y_tr) == 0 or len(y_te) == 0:
        raise DataError(f"{directory}: the train or test batches hold no images")
    scale = np.float32(1.0 / 255.0)
    return _to_dataset(
        "cifar10",
        x_tr.astype(np.float32) * scale,
        y_tr,
        x_te.astype(np.float32) * scale,
        y_te,
        CIFAR_NUM_CLASSES,
    )


def _load_npz(file: Path, seed: int, test_fraction: float) -> Dataset:
    arrays: dict[str, Any] = read_npz(file)
    x, y = arrays["x"], arrays["y"]
    if "x_test" in arrays:
        x_tr, y_tr, x_te, y_te = x, y, arrays["x_test"], arrays["y_test"]
    else:
        x_tr, x_te, y_tr, y_te = _split(x, y, seed, test_fraction, str(file))
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return _to_dataset("npz", x_tr, y_tr, x_te, y_te, num_classes)
