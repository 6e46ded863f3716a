"""Everything a run needs before training starts: data, shards, the model, its FLOPs,
the loss and metric, replicas.

Data comes from a built-in set (tensors, `cached_dataset`) or the user's builder
("pkg.module:fn" returning (train, test) map-style Datasets); either way replicas read
their shard by index from one shared copy (data/examples.py). The model is built once
per process and every replica starts from a copy of it, as in synchronous data
parallelism. Everything the user's code can get wrong is found here, before training
(and, in the dist engine, before any worker process starts).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlion.core.config import ExperimentConfig
from dlion.core.errors import ConfigError, DataError
from dlion.core.usercode import call_user, load_callable
from dlion.data import Dataset, load_dataset, partition
from dlion.data.examples import (
    DatasetExamples,
    Examples,
    TensorExamples,
    class_labels,
    item_shape,
    read_labels,
)
from dlion.training.model_io import SavedModel, choose_state, model_spec, save_model
from dlion.training.models import build_model, train_flops_per_sample
from dlion.training.objective import Objective, build_objective
from dlion.training.replica import Replica

_FLOP_SAMPLES = 4  # real training samples the FLOP count runs on


@dataclass(frozen=True)
class Prepared:
    train: Examples
    test: Examples  # the evaluation set (evaluation.max_test_samples applied)
    input_shape: tuple[int, ...]
    num_classes: int | None  # None: not a classification task
    shards: list[np.ndarray]  # train indices per worker
    flops_per_sample: int  # one training step (forward + backward) per sample
    objective: Objective
    template: nn.Module  # the initial model every replica copies


@functools.lru_cache(maxsize=8)
def cached_dataset(
    name: str,
    path: str | None,
    seed: int,
    test_fraction: float,
    num_samples: int | None,
    num_features: int,
    num_classes: int,
) -> Dataset:
    # A bench runs many (strategy, seed) pairs on one dataset; load it once per process.
    return load_dataset(
        name,
        path=path,
        seed=seed,
        test_fraction=test_fraction,
        num_samples=num_samples,
        num_features=num_features,
        num_classes=num_classes,
    )


@dataclass(frozen=True)
class LoadedData:
    train: Examples
    test: Examples
    train_labels: np.ndarray | None  # class ids (classification) for the partitioners
    input_shape: tuple[int, ...]
    num_classes: int | None


def load_data(cfg: ExperimentConfig, objective: Objective) -> LoadedData:
    """The train and test examples of `cfg.data`, checked against the loss."""
    d = cfg.data
    if d.is_builtin:
        # The dataset split is fixed (seed 0) so seeds vary training, not the test set.
        ds = cached_dataset(
            d.name, d.path, 0, d.test_fraction, d.num_samples, d.num_features, d.num_classes
        )
        if not objective.classification and cfg.train.loss == "mse":
            raise ConfigError(
                f"train.loss: mse needs float targets; dataset {d.name!r} has class labels "
                "(use cross_entropy, or your own loss)"
            )
        return LoadedData(
            TensorExamples(ds.x_train, ds.y_train),
            TensorExamples(ds.x_test, ds.y_test),
            ds.y_train.numpy(),
            ds.input_shape,
            ds.num_classes,
        )
    return _load_user_data(cfg, objective)


def _load_user_data(cfg: ExperimentConfig, objective: Objective) -> LoadedData:
    d = cfg.data
    builder = load_callable(d.name, "data.name")
    made: Any = call_user(builder, "data", **d.options)
    if not (isinstance(made, tuple | list) and len(made) == 2):
        raise ConfigError(
            f"data.name: {d.name!r} returned {type(made).__name__}, expected (train, test) datasets"
        )
    parts: list[DatasetExamples] = []
    for split, ds in zip(("train", "test"), made, strict=True):
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise ConfigError(
                f"data.name: the {split} set is a {type(ds).__name__}, not a map-style Dataset"
            )
        if len(ds) == 0:
            raise DataError(f"data: the {split} set of {d.name!r} is empty")
        parts.append(DatasetExamples(ds, f"data ({split} set of {d.name})"))
    train, test = parts
    labels_fn = load_callable(d.labels, "data.labels") if d.labels else None
    input_shape = item_shape(train)
    labels: np.ndarray | None = None
    num_classes: int | None = None
    if objective.classification or d.partition != "iid":
        where = f"data ({d.name} train labels)"
        raw = read_labels(train.dataset, where, labels_fn)
        if len(raw) != len(train):
            raise DataError(f"{where}: {len(raw)} labels for {len(train)} samples")
        labels = class_labels(raw, where)
        test_labels = class_labels(
            read_labels(test.dataset, "data (test labels)"), "data (test labels)"
        )
        num_classes = int(max(labels.max(), test_labels.max())) + 1
        declared = getattr(train.dataset, "classes", None)
        if declared is not None and len(declared) >= num_classes:
            num_classes = len(declared)
    return LoadedData(train, test, labels, input_shape, num_classes)


def prepare(cfg: ExperimentConfig, num_workers: int) -> Prepared:
    objective = build_objective(cfg.train, cfg.evaluation)
    data = load_data(cfg, objective)
    d = cfg.data
    if data.train_labels is None:
        if d.partition != "iid":
            raise ConfigError(f"data.partition: {d.partition} needs integer class labels")
        labels = np.zeros(len(data.train), dtype=np.int64)  # iid ignores the labels
    else:
        labels = data.train_labels
    shards = partition(
        labels,
        num_workers,
        d.partition,
        seed=cfg.train.seed,
        alpha=d.alpha,
        shards_per_part=d.shards_per_worker,
    )
    template = make_model(cfg, data.input_shape, data.num_classes)
    sample, _ = data.train.batch(torch.arange(min(_FLOP_SAMPLES, len(data.train))))
    flops = train_flops_per_sample(template, data.input_shape, sample)
    test = data.test
    limit = cfg.evaluation.max_test_samples
    if limit is not None and limit < len(test):
        test = test.head(limit)  # type: ignore[attr-defined]
    _check_forward(template, data, objective)
    return Prepared(
        data.train, test, data.input_shape, data.num_classes, shards, flops, objective, template
    )


def _check_forward(model: nn.Module, data: LoadedData, objective: Objective) -> None:
    """One forward pass and loss on two samples (on a copy): a model, data and loss that do
    not fit together fail here with one line, not in the middle of a run."""
    probe = copy.deepcopy(model)
    x, y = data.train.batch(torch.arange(min(2, len(data.train))))
    try:
        out = probe(x)
        loss = objective.loss(out, y)
    except Exception as exc:
        raise ConfigError(
            f"model/train.loss: a forward pass on the training data failed: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError("train.loss: the loss function must return a scalar tensor")
    if (
        objective.classification
        and data.num_classes is not None
        and out.shape[-1] < data.num_classes
    ):
        raise ConfigError(
            f"model: outputs have {out.shape[-1]} classes but the labels go up to "
            f"{data.num_classes - 1}"
        )


def make_model(
    cfg: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int | None
) -> nn.Module:
    m = cfg.model
    # Every replica starts from the same initialization, as in synchronous data parallelism.
    return build_model(
        m.name,
        input_shape,
        num_classes if num_classes is not None else 1,
        hidden=m.hidden,
        channels=m.channels,
        seed=cfg.train.seed,
        options=m.options,
    )


def make_replica(cfg: ExperimentConfig, prep: Prepared, rank: int) -> Replica:
    idx = torch.from_numpy(np.asarray(prep.shards[rank], dtype=np.int64))
    return Replica(
        copy.deepcopy(prep.template),
        prep.train,
        idx,
        train=cfg.train,
        seed=cfg.train.seed * 1000 + rank,
        objective=prep.objective,
    )


def save_trained_model(
    out_dir: Path,
    cfg: ExperimentConfig,
    prep: Prepared,
    states: list[tuple[int, torch.Tensor]],
    results: list[tuple[float, float]],
    counters_from: nn.Module | None = None,
) -> SavedModel | None:
    """Write out_dir/model.safetensors from the live replicas' model states (rank order)
    and final (metric, loss), as `output.save_model` chooses. Integer buffers (counters such
    as BatchNorm's num_batches_tracked) are not in a model state; they come from
    `counters_from` when given. Returns what was saved (None when saving is off)."""
    if cfg.output.save_model == "none" or not states:
        return None
    holder = make_replica(cfg, prep, 0)

    def evaluate(state: torch.Tensor) -> tuple[float, float]:
        holder.set_model_state(state)
        return holder.evaluate(prep.test, batch_size=cfg.evaluation.batch_size)

    state, saved = choose_state(
        cfg.output.save_model, states, results, prep.objective.higher_is_better, evaluate
    )
    holder.set_model_state(state)
    if counters_from is not None:
        own = dict(holder.model.named_buffers())
        with torch.no_grad():
            for name, buf in counters_from.named_buffers():
                if not buf.is_floating_point() and name in own:
                    own[name].copy_(buf)
    save_model(out_dir, holder.model, model_spec(cfg, prep.input_shape, prep.num_classes), saved)
    return saved


def evaluate_saved_model(cfg: ExperimentConfig, run_dir: Path) -> tuple[float, float]:
    """(metric, loss) of the model saved in run_dir on the test set of its config."""
    from dlion.training.model_io import load_model

    model = load_model(run_dir)
    prep = prepare(cfg, 1)
    holder = make_replica(cfg, prep, 0)
    holder.model.load_state_dict(model.state_dict())
    return holder.evaluate(prep.test, batch_size=cfg.evaluation.batch_size)
