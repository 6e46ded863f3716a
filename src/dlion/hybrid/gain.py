"""The gain router: send the inputs where querying the cloud is expected to help most.

Rule (issue 21; the ranking is the one the oracle uses, `proxy.oracle_scores`, with each
model's correctness replaced by its estimated probability):
- inputs: the raw input (flattened) and the edge's outputs: softmax probabilities, their
  entropy and the top-k margins p(1) - p(j) (`gain_features`); all are defined the same way
  for any edge model, so a router trained on one edge's outputs applies to another's;
- two logits: P(edge right | inputs) and P(cloud right | inputs), each trained with binary
  cross-entropy (`gain_loss`);
- send score = P(cloud right) - P(edge right) (`gain_score`): sending the top scores first
  maximises the expected accuracy at every coverage when the probabilities are right;
- honest targets: edge and cloud correctness come from cross-fitting (`fold_ids`): the
  training split is cut into `folds` parts and each part is labelled by an edge and a cloud
  trained on the other parts, so the router sees the mistakes the models make on unseen
  inputs, not the near-perfect fit of their own training data (which made the paper's proxy
  labels optimistic: RESULTS.md section 4).
"""

from __future__ import annotations

import torch
from torch import nn

from dlion.hybrid.proxy import entropy, top_k_margins

EDGE, CLOUD = 0, 1  # columns of the router's two logits


def gain_features(x: torch.Tensor, logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Router input per input: [flattened input, edge softmax, its entropy, top-k margins]."""
    probs = torch.softmax(logits, dim=1)
    flat = x.reshape(x.shape[0], -1)
    return torch.cat([flat, probs, entropy(probs)[:, None], top_k_margins(probs, top_k)], dim=1)


def gain_feature_dim(input_values: int, num_classes: int, top_k: int) -> int:
    return input_values + num_classes + 1 + (top_k - 1)


def gain_loss(
    logits: torch.Tensor, edge_correct: torch.Tensor, cloud_correct: torch.Tensor
) -> torch.Tensor:
    """BCE of the edge-right logit plus BCE of the cloud-right logit; logits (n, 2)."""
    bce = nn.functional.binary_cross_entropy_with_logits
    return bce(logits[:, EDGE], edge_correct.float()) + bce(logits[:, CLOUD], cloud_correct.float())


def gain_score(logits: torch.Tensor) -> torch.Tensor:
    """Send score (n,): estimated P(cloud right) - P(edge right), in [-1, 1]."""
    probs = torch.sigmoid(logits)
    return probs[:, CLOUD] - probs[:, EDGE]


def fold_ids(n: int, folds: int, seed: int) -> torch.Tensor:
    """Fold of each of n inputs (int64), a random balanced assignment: position i of a random
    permutation goes to fold i mod folds."""
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be between 2 and {n}, got {folds}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ids = torch.empty(n, dtype=torch.int64)
    ids[order] = torch.arange(n) % folds
    return ids
