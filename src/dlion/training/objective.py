"""What training minimises (the loss) and what evaluation reports (the metric).

Losses: `cross_entropy` (integer class targets), `mse` (float targets of the output's
shape), or the user's fn(outputs, targets) -> scalar tensor. Metrics: `accuracy`
(argmax over the last axis), `loss` (the training loss on the test set, lower is better)
or the user's fn(outputs, targets) -> float, the mean over the batch. Evaluation sums
metric x batch size over minibatches and divides by the sample count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlion.core.config import EvaluationConfig, TrainConfig
from dlion.core.errors import ConfigError
from dlion.core.usercode import load_callable

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs, targets.to(outputs.dtype).view_as(outputs))


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float((outputs.argmax(dim=-1) == targets).float().mean())


def build_loss(train: TrainConfig) -> LossFn:
    if train.loss == "cross_entropy":
        return F.cross_entropy
    if train.loss == "mse":
        return _mse
    return load_callable(train.loss, "train.loss")


@dataclass(frozen=True)
class Objective:
    """The loss and the evaluation metric of a run."""

    loss: LossFn
    metric: MetricFn | None  # None: the metric is the loss itself
    higher_is_better: bool
    classification: bool  # targets are integer class ids (partitioners may use them)


def build_objective(train: TrainConfig, evaluation: EvaluationConfig) -> Objective:
    loss = build_loss(train)
    if evaluation.metric == "accuracy":
        metric: MetricFn | None = _accuracy
    elif evaluation.metric == "loss":
        metric = None
    else:
        metric = load_callable(evaluation.metric, "evaluation.metric")
    if evaluation.metric == "accuracy" and train.loss == "mse":
        raise ConfigError("evaluation.metric: accuracy needs a classification loss")
    classification = train.loss == "cross_entropy" or evaluation.metric == "accuracy"
    return Objective(loss, metric, evaluation.higher_better, classification)
