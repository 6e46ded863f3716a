"""The kNN router baseline and the gain router's pure parts, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from dlion.hybrid.evaluate import gap_closed, random_accuracy
from dlion.hybrid.gain import fold_ids, gain_features, gain_loss, gain_score
from dlion.hybrid.knn import EPS, TIE_BREAK, KnnRouter, knn_scores, routed_accuracy, tune_k

# Four memory points on a line with gains (cloud right - edge right) -1, 0, 1, 1.
MEMORY = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
GAINS = torch.tensor([-1.0, 0.0, 1.0, 1.0])


def test_knn_scores_are_inverse_distance_weighted_means() -> None:
    # Query 0.5, k=2: neighbours 0 and 1 at distance 0.5 each: (-1 + 0) / 2.
    # Query 2.75, k=2: neighbours 3 (d 0.25, gain 1) and 2 (d 0.75, gain 1): 1.
    # Query 1.25, k=3: neighbours 1 (d .25, 0), 2 (d .75, 1), 0 (d 1.25, -1).
    scores = knn_scores(torch.tensor([[0.5], [2.75]]), MEMORY, GAINS, k=2)
    torch.testing.assert_close(scores, torch.tensor([-0.5, 1.0]))
    w = [1 / (0.25 + EPS), 1 / (0.75 + EPS), 1 / (1.25 + EPS)]
    expected = (w[1] * 1 - w[2]) / sum(w)
    got = knn_scores(torch.tensor([[1.25]]), MEMORY, GAINS, k=3)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # k larger than the memory uses all of it.
    assert knn_scores(torch.tensor([[1.5]]), MEMORY, GAINS, k=10).shape == (1,)


def test_knn_router_standardises_and_breaks_ties_by_entropy() -> None:
    router = KnnRouter(in_features=1, size=4)
    edge_right = torch.tensor([True, True, False, False])
    cloud_right = torch.tensor([False, True, True, True])
    router.fit(MEMORY, edge_right, cloud_right, k=1)
    torch.testing.assert_close(router.targets, GAINS)
    # Memory std of [0, 1, 2, 3] is sqrt(5/3); the nearest of 2.9 is 3 (gain 1).
    assert float(router.std[0]) == pytest.approx(math.sqrt(5 / 3))
    scores = router(torch.tensor([[2.9], [1.0], [1.0]]), torch.tensor([0.0, 0.5, 1.0]))
    assert float(scores[0]) == pytest.approx(1.0)
    # Two inputs on the same gain-0 neighbour: the more uncertain edge output scores higher.
    assert float(scores[2] - scores[1]) == pytest.approx(0.5 * TIE_BREAK, rel=1e-3)


def test_routed_accuracy_sends_the_highest_scores() -> None:
    # 10 inputs; the edge is wrong exactly on 0..4, the cloud always right.
    edge = torch.arange(10) >= 5
    cloud = torch.ones(10, dtype=torch.bool)
    perfect = (~edge).float()  # sends the edge's mistakes first
    # Coverage c sends 10(1 - c) of the 5 mistakes: accuracy 1.0, .9, .8, .7, .6.
    assert routed_accuracy(perfect, edge, cloud) == pytest.approx(0.8)
    # Reversed: it sends right answers and keeps all 5 mistakes: 0.5 at every coverage.
    assert routed_accuracy(-perfect, edge, cloud) == pytest.approx(0.5)


def test_tune_k_scores_each_k_and_keeps_the_smallest_best() -> None:
    # Two clusters: near 0 the edge is wrong and the cloud right (gain 1), near 10 both are
    # right (gain 0). Every k ranks the held-out fold perfectly, so the smallest k wins.
    x = torch.cat([0.1 * torch.arange(10.0), 10 + 0.1 * torch.arange(10.0)])[:, None]
    edge = torch.arange(20) >= 10
    cloud = torch.ones(20, dtype=torch.bool)
    folds = torch.arange(20) % 2
    best, results = tune_k(x, edge, cloud, folds, [3, 1, 5])
    assert best == 1
    assert sorted(results) == [1, 3, 5]
    # Per fold: 10 inputs, 5 mistakes, a perfect ranking: 0.8 (as above).
    assert all(v == pytest.approx(0.8) for v in results.values())


def test_gain_score_and_loss() -> None:
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [-10.0, 10.0]])  # columns: edge, cloud
    torch.testing.assert_close(
        gain_score(logits), torch.tensor([0.0, -1.0, 1.0]), atol=1e-4, rtol=0
    )
    loss = gain_loss(logits[:1], torch.tensor([True]), torch.tensor([False]))
    assert float(loss) == pytest.approx(2 * math.log(2))


def test_gain_features_are_input_softmax_entropy_margins() -> None:
    x = torch.tensor([[[1.0, 2.0]]])  # (1, 1, 2)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    out = gain_features(x, logits, top_k=3)
    ent = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    expected = torch.tensor([[1.0, 2.0, 0.5, 0.3, 0.2, ent, 0.2, 0.3]])
    torch.testing.assert_close(out, expected)


def test_fold_ids_are_balanced_and_seeded() -> None:
    ids = fold_ids(10, 3, seed=0)
    assert sorted(torch.bincount(ids).tolist()) == [3, 3, 4]
    assert torch.equal(ids, fold_ids(10, 3, seed=0))
    with pytest.raises(ValueError, match="folds"):
        fold_ids(2, 3, seed=0)


def test_gap_closed_between_random_and_oracle() -> None:
    rand = random_accuracy(0.6, 0.9, 0.5)
    assert rand == pytest.approx(0.75)
    assert gap_closed(0.85, rand, 0.95) == pytest.approx(0.5)
    assert gap_closed(0.70, rand, 0.95) == pytest.approx(-0.25)
    assert gap_closed(0.9, 0.9, 0.9) is None
