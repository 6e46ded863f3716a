"""Keep-the-better rule of few-label transfer: folds, the comparison, and the kept model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dlion.core.errors import ConfigError
from dlion.transfer.config import load_transfer_config
from dlion.transfer.select import (
    FEW_LABEL,
    ZERO_LABEL,
    FitHead,
    choose_head,
    keep_better,
    validation_folds,
)


def _folds(k: int) -> tuple[list[np.ndarray], str]:
    return validation_folds(k, holdout_min_k=100, holdout_fraction=0.25, cv_folds=5, seed=0)


def test_leave_one_out_below_the_fold_count() -> None:
    folds, scheme = _folds(4)
    assert scheme == "leave-one-out CV"
    assert sorted(int(f[0]) for f in folds) == [0, 1, 2, 3]
    assert all(len(f) == 1 for f in folds)


def test_cross_validation_folds_cover_every_label_once() -> None:
    folds, scheme = _folds(12)
    assert scheme == "5-fold CV"
    assert sorted(len(f) for f in folds) == [2, 2, 2, 3, 3]
    assert sorted(np.concatenate(folds).tolist()) == list(range(12))


def test_one_hold_out_from_holdout_min_k() -> None:
    folds, scheme = _folds(100)
    assert scheme == "hold-out 25%"
    assert len(folds) == 1 and len(folds[0]) == 25 and len(set(folds[0].tolist())) == 25


def test_too_few_labels_to_hold_out() -> None:
    with pytest.raises(ValueError, match="k=1"):
        _folds(1)


def test_keep_better_needs_strictly_more_right() -> None:
    assert keep_better(6, 5) == FEW_LABEL
    assert keep_better(5, 5) == ZERO_LABEL  # a tie keeps the model that needs no labels
    assert keep_better(2, 5) == ZERO_LABEL


def _head(weight: list[list[float]]) -> nn.Linear:
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
    return head


# Two classes on 2-D features: class c has feature c large. The zero-label head is right.
FEATURES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0], [1.0, 0.1], [0.1, 1.0]])
LABELS = torch.tensor([0, 1, 0, 1, 0, 1])
IDENTITY = [[1.0, 0.0], [0.0, 1.0]]
SWAPPED = [[0.0, 1.0], [1.0, 0.0]]


def _fit_to(weight: list[list[float]]) -> tuple[FitHead, list[int]]:
    """A 'training' that sets the head to `weight` and records the labels it was given."""
    seen: list[int] = []

    def fit(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> None:
        seen.append(len(labels))
        with torch.no_grad():
            head.weight.copy_(torch.tensor(weight))

    return fit, seen


def test_a_worse_few_label_head_returns_the_zero_label_model() -> None:
    zero = _head(IDENTITY)  # 6/6 right
    fit, seen = _fit_to(SWAPPED)  # the fine-tuned head gets every held-out label wrong
    folds, scheme = _folds(6)
    kept, candidate, choice = choose_head(
        6, FEATURES, LABELS, zero, lambda: _head(IDENTITY), fit, folds, scheme
    )
    assert kept is zero
    assert torch.equal(kept.weight, torch.tensor(IDENTITY))
    assert torch.equal(candidate.weight, torch.tensor(SWAPPED))  # reported, not kept
    assert (choice.kept, choice.n_val, choice.few_correct, choice.zero_correct) == (
        ZERO_LABEL,
        6,
        0,
        6,
    )
    # 5 folds (one of 2 labels), then the candidate on all 6 labels for the report.
    assert sorted(seen[:-1]) == [4, 5, 5, 5, 5] and seen[-1] == 6
    assert choice.reason == (
        "fine-tuned head 0.0% <= zero-label 100.0% on 6 held-out labels (5-fold CV)"
    )


def test_a_better_few_label_head_is_kept_and_refitted_on_all_labels() -> None:
    zero = _head(SWAPPED)  # 0/6 right
    fit, seen = _fit_to(IDENTITY)
    folds, scheme = validation_folds(6, holdout_min_k=4, holdout_fraction=0.5, cv_folds=5, seed=1)
    kept, candidate, choice = choose_head(
        6, FEATURES, LABELS, zero, lambda: _head(SWAPPED), fit, folds, scheme
    )
    assert kept is candidate and kept is not zero
    assert torch.equal(kept.weight, torch.tensor(IDENTITY))
    assert (choice.kept, choice.scheme, choice.n_val, choice.few_correct) == (
        FEW_LABEL,
        "hold-out 50%",
        3,
        3,
    )
    assert seen == [3, 6]


def test_keep_better_config_rules() -> None:
    with pytest.raises(ConfigError, match="labels: ks: every label budget must be >= 2"):
        load_transfer_config("synthetic", ["labels.ks=[1,50]"])
    with pytest.raises(ConfigError, match=r"labels\.keep_better: a linear few-label head"):
        load_transfer_config("synthetic", ["labels.head=linear"])
    cfg = load_transfer_config("synthetic", ["labels.head=linear", "labels.keep_better=false"])
    assert cfg.labels.head == "linear"
