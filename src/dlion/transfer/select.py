"""Keep-the-better rule for few-label transfer (RecycleML, EdgeSys '18): a head trained on k
target labels replaces the zero-label model only when it is better on labels it did not see.

Rule (issue 21):
1. The candidate starts from the transferred head (the source head on the transferred
   encoder, i.e. the zero-label model) and is fine-tuned on the few labels.
2. Its accuracy is compared with the zero-label model's on held-out labels:
   - k >= `holdout_min_k` (default 50): one hold-out of `holdout_fraction` (default 0.25) of
     the k labels; the candidate trains on the rest;
   - fewer labels: `cv_folds`-fold cross-validation (default 5; leave-one-out when k < 5):
     each label is held out once, the candidate of its fold is trained on the others.
3. The candidate is kept only if it gets strictly more held-out labels right than the
   zero-label model (a tie keeps the zero-label model: it needs no labels and cannot
   overfit them); it is then refitted on all k labels. Otherwise the zero-label model is
   kept unchanged.
Zero-label predictions need no training, so both are scored on exactly the same labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

import numpy as np
import torch
from torch import nn

FEW_LABEL: Final = "few-label"
ZERO_LABEL: Final = "zero-label"

# Trains a head on (features, labels) in place.
FitHead = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
MakeHead = Callable[[], nn.Module]


@dataclass(frozen=True)
class Choice:
    """Which model was kept for one label budget k, and the evidence."""

    k: int
    kept: Literal["few-label", "zero-label"]
    scheme: str  # "hold-out 25%", "5-fold CV", "leave-one-out CV"
    n_val: int  # held-out labels the two models were compared on
    few_correct: int  # of them, right by the fine-tuned candidate
    zero_correct: int  # of them, right by the zero-label model

    @property
    def reason(self) -> str:
        few = self.few_correct / self.n_val
        zero = self.zero_correct / self.n_val
        relation = ">" if self.few_correct > self.zero_correct else "<="
        return (
            f"fine-tuned head {few:.1%} {relation} zero-label {zero:.1%} on "
            f"{self.n_val} held-out labels ({self.scheme})"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"reason": self.reason}


def keep_better(few_correct: int, zero_correct: int) -> Literal["few-label", "zero-label"]:
    """The few-label candidate only if it is strictly better on the held-out labels."""
    return FEW_LABEL if few_correct > zero_correct else ZERO_LABEL


def validation_folds(
    k: int, *, holdout_min_k: int, holdout_fraction: float, cv_folds: int, seed: int
) -> tuple[list[np.ndarray], str]:
    """Held-out position sets over range(k) and the scheme's name: one hold-out set when
    k >= holdout_min_k, else min(cv_folds, k) disjoint folds covering every position."""
    if k < 2:
        raise ValueError(f"k={k}: at least 2 labels are needed to hold any out")
    order = np.random.default_rng(seed).permutation(k)
    if k >= holdout_min_k:
        n_val = min(k - 1, max(1, round(holdout_fraction * k)))
        return [np.sort(order[:n_val])], f"hold-out {holdout_fraction:.0%}"
    folds = min(cv_folds, k)
    scheme = "leave-one-out CV" if folds == k else f"{folds}-fold CV"
    return [np.sort(order[i::folds]) for i in range(folds)], scheme


@torch.no_grad()
def _correct(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> int:
    head.eval()
    return int((head(features).argmax(dim=1) == labels).sum())


def choose_head(
    k: int,
    features: torch.Tensor,
    labels: torch.Tensor,
    zero_head: nn.Module,
    make_candidate: MakeHead,
    fit: FitHead,
    folds: list[np.ndarray],
    scheme: str,
) -> tuple[nn.Module, nn.Module, Choice]:
    """Apply the rule to k labelled samples given as frozen-encoder `features`.

    `make_candidate()` returns a fresh candidate head (a copy of the transferred head),
    `fit(head, features, labels)` fine-tunes it. Returns the kept head, the candidate
    fitted on all k labels (kept or not, so a report can show what the rule avoided) and
    the Choice."""
    few_correct = zero_correct = n_val = 0
    for held in folds:
        held_t = torch.as_tensor(held)
        train = torch.as_tensor(np.setdiff1d(np.arange(k), held))
        candidate = make_candidate()
        fit(candidate, features[train], labels[train])
        few_correct += _correct(candidate, features[held_t], labels[held_t])
        zero_correct += _correct(zero_head, features[held_t], labels[held_t])
        n_val += len(held)
    kept = keep_better(few_correct, zero_correct)
    choice = Choice(k, kept, scheme, n_val, few_correct, zero_correct)
    candidate = make_candidate()
    fit(candidate, features, labels)
    return (candidate if kept == FEW_LABEL else zero_head), candidate, choice
