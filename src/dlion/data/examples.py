"""Examples read by index: the one way replicas and evaluation see a dataset.

Built-in sets are tensors and a batch is one indexing operation (`TensorExamples`); a
user's map-style `torch.utils.data.Dataset` is read item by item (or through its
`__getitems__`) and collated (`DatasetExamples`). Nothing is copied per replica: a
replica holds its shard's indices, never a copy of its samples.

Labels for the partitioners come from, in order: the `data.labels` function of the config,
the dataset's `targets` attribute (as torchvision's datasets have), or one pass reading
item[1] of every sample. Classification needs integer labels in [0, num_classes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import default_collate

from dlion.core.errors import DataError


class Examples(Protocol):
    """A dataset split that hands out batches by index."""

    def __len__(self) -> int: ...

    def batch(self, idx: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(inputs, targets) of the samples at positions `idx`."""
        ...


class TensorExamples:
    """Inputs and targets held as two tensors (the built-in datasets)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise DataError(f"inputs and targets differ in length ({len(x)} vs {len(y)})")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]

    def head(self, n: int) -> TensorExamples:
        return TensorExamples(self.x[:n], self.y[:n])


class DatasetExamples:
    """A user's map-style Dataset: `ds[i]` is `(input, target)`; batches are collated."""

    def __init__(self, dataset: TorchDataset[Any], where: str) -> None:
        try:
            self.size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise DataError(
                f"{where}: the dataset has no len(); give a map-style Dataset"
            ) from None
        self.dataset = dataset
        self.where = where

    def __len__(self) -> int:
        return self.size

    def batch(self, idx: torch.Tensor) -> tuple[Any, torch.Tensor]:
        indices = idx.tolist()
        try:
            getitems = getattr(self.dataset, "__getitems__", None)
            items = (
                getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
            )
            x, y = default_collate(items)
        except Exception as exc:
            raise DataError(
                f"{self.where}: reading a batch failed: {type(exc).__name__}: {exc}"
            ) from None
        return x, torch.as_tensor(y)

    def head(self, n: int) -> DatasetExamples:
        return DatasetExamples(torch.utils.data.Subset(self.dataset, range(n)), self.where)


def item_shape(examples: Examples) -> tuple[int, ...]:
    """Shape of one input (no batch axis), read from the first sample."""
    x, _ = examples.batch(torch.tensor([0]))
    if not isinstance(x, torch.Tensor):
        raise DataError("data: inputs must be tensors (or collate to one)")
    return tuple(int(d) for d in x.shape[1:])


def read_labels(
    dataset: TorchDataset[Any], where: str, labels_fn: Callable[[Any], Any] | None = None
) -> np.ndarray:
    """The targets of every sample as a numpy array (see the module docstring for where
    they come from)."""
    if labels_fn is not None:
        raw: Any = labels_fn(dataset)
    elif hasattr(dataset, "targets"):
        raw = dataset.targets
    else:
        raw = [_target_of(dataset[i], where) for i in range(len(dataset))]  # type: ignore[arg-type]
    if isinstance(raw, torch.Tensor):
        arr = raw.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(raw)
        except Exception as exc:
            raise DataError(f"{where}: labels cannot be read as an array ({exc})") from None
    if arr.ndim == 0:
        raise DataError(f"{where}: labels must be a sequence, got a scalar")
    return arr


def _target_of(item: Any, where: str) -> Any:
    if not isinstance(item, Sequence) or len(item) < 2:
        raise DataError(f"{where}: a sample must be an (input, target) pair")
    target = item[1]
    return target.item() if isinstance(target, torch.Tensor) and target.numel() == 1 else target


def class_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """`labels` as non-negative int64 class ids, checked before anything is allocated from
    them; DataError naming `where` otherwise."""
    if labels.ndim != 1:
        raise DataError(f"{where}: classification needs one integer label per sample")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError(f"{where}: labels must be integers for a classification loss")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{where}: labels must be integers, found {labels.dtype}")
    out = labels.astype(np.int64)
    if len(out) and out.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(out.min())}")
    return out
