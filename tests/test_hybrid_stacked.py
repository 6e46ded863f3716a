"""The stacked router (entropy plus a cross-validated ridge correction): its features and fit
on hand-computed cases, its choice of lambda, the behaviour a user relies on (it beats entropy
where entropy is blind and stays with entropy where there is nothing to add), and a saved
stacked run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from dlion.core.errors import ConfigError
from dlion.hybrid import train as train_module
from dlion.hybrid.config import load_hybrid_config
from dlion.hybrid.inference import edge_scores
from dlion.hybrid.knn import routed_accuracy
from dlion.hybrid.stacked import (
    StackedRouter,
    choose_lambda,
    cv_fold_ids,
    fit_stacked,
    stack_features,
    stacked_scores,
)
from dlion.hybrid.store import load_run, save_run
from dlion.hybrid.train import load_splits, train_hybrid

INF = math.inf


def test_stack_features_on_hand_computed_probabilities() -> None:
    # Edge softmax (0.5, 0.3, 0.2), one fold edge (0.2, 0.6, 0.2): the mean is
    # (0.35, 0.45, 0.2); the edge says class 0, the fold edge class 1.
    edge = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    fold = torch.log(torch.tensor([[0.2, 0.6, 0.2]]))
    got = stack_features(edge, [fold])[0]

    def h(ps: list[float]) -> float:
        return -sum(p * math.log(p) for p in ps)

    expected = [h([0.5, 0.3, 0.2]), 0.5, 0.2, h([0.35, 0.45, 0.2]), 0.65, 1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    # Without fold edges the ensemble is the edge itself and nobody disagrees.
    alone = stack_features(edge, [])[0]
    assert float(alone[3]) == pytest.approx(h([0.5, 0.3, 0.2]))
    assert float(alone[4]) == pytest.approx(0.5)
    assert float(alone[5]) == 0.0


def test_fit_with_infinite_lambda_is_entropy_by_least_squares() -> None:
    # Entropy x = 0, 1, 2, 3 and benefit t = 0, 0, 1, 1: slope cov/var = 0.5/1.25 = 0.4,
    # fitted t = 0.5 + 0.4 (x - 1.5) = -0.1, 0.3, 0.7, 1.1. The second column (t itself)
    # would predict perfectly, but lambda = inf leaves it out.
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    t = torch.tensor([0.0, 0.0, 1.0, 1.0])
    features = torch.stack([x, t], dim=1)
    mean, std, w = fit_stacked(features, t, INF)
    assert float(w[2]) == 0.0
    scores = stacked_scores(features, mean, std, w)
    torch.testing.assert_close(scores, torch.tensor([-0.1, 0.3, 0.7, 1.1]))


def test_fit_without_penalty_uses_the_perfect_feature_and_penalty_shrinks_it() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    t = torch.tensor([0.0, 0.0, 1.0, 1.0])
    features = torch.stack([x, t], dim=1)
    mean, std, w = fit_stacked(features, t, 0.0)
    torch.testing.assert_close(stacked_scores(features, mean, std, w), t, atol=1e-5, rtol=0)
    weights = [abs(float(fit_stacked(features, t, lam)[2][2])) for lam in (0.01, 0.1, 1.0)]
    assert weights[0] > weights[1] > weights[2] > 0
    with pytest.raises(ValueError, match="lambda"):
        fit_stacked(features, t, -1.0)


def test_cv_folds_are_balanced_and_fixed() -> None:
    ids = cv_fold_ids(12, 5, repeat=0)
    assert torch.bincount(ids).tolist() == [3, 3, 2, 2, 2]
    assert torch.equal(ids, cv_fold_ids(12, 5, repeat=0))
    assert not torch.equal(ids, cv_fold_ids(12, 5, repeat=1))


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three classes. Where the edge says class 0 or 1 its entropy tells its mistakes apart;
    where it says class 2 every softmax is the same (entropy is blind) and the edge is wrong
    exactly when the fold edge disagrees. The cloud is always right."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 3, (n,), generator=g)
    confident = torch.rand(n, generator=g) < 0.5
    top = torch.where(confident, torch.tensor(0.9), torch.tensor(0.5))
    top = torch.where(pred == 2, torch.tensor(0.7), top)
    probs = ((1 - top) / 2)[:, None].repeat(1, 3)
    probs[torch.arange(n), pred] = top
    # Classes 0, 1: wrong with probability 0.05 when confident, 0.6 when not.
    p_wrong = torch.where(confident, torch.tensor(0.05), torch.tensor(0.6))
    edge_wrong = torch.rand(n, generator=g) < p_wrong
    # Class 2: wrong on half of the inputs, and the fold edge disagrees exactly there.
    blind = pred == 2
    edge_wrong = torch.where(blind, torch.rand(n, generator=g) < 0.5, edge_wrong)
    fold_pred = torch.where(blind & edge_wrong, (pred + 1) % 3, pred)
    fold_probs = torch.full((n, 3), 0.1)
    fold_probs[torch.arange(n), fold_pred] = 0.8
    features = stack_features(torch.log(probs), [torch.log(fold_probs)])
    return features, ~edge_wrong, torch.ones(n, dtype=torch.bool)


def test_stacked_beats_entropy_where_entropy_is_blind() -> None:
    train, edge_train, cloud_train = _synthetic(600, seed=0)
    test, edge_test, cloud_test = _synthetic(2000, seed=1)
    lam, cv = choose_lambda(train, edge_train, cloud_train, [1.0, 0.1, 0.01])
    assert lam < INF and cv[lam] > cv[INF]
    mean, std, w = fit_stacked(train, cloud_train.double() - edge_train.double(), lam)
    stacked = routed_accuracy(stacked_scores(test, mean, std, w), edge_test, cloud_test)
    entropy_only = routed_accuracy(test[:, 0].float(), edge_test, cloud_test)
    assert stacked > entropy_only + 0.03


def test_stacked_falls_back_to_entropy_when_nothing_else_helps() -> None:
    # The edge is wrong exactly on its uncertain inputs: entropy ranks perfectly, the other
    # features carry no more; every lambda ranks as well, so the largest (inf) is kept.
    n = 300
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (n,), generator=g)
    top = torch.where(torch.rand(n, generator=g) < 0.3, 0.4, 0.95)
    probs = ((1 - top) / 2)[:, None].repeat(1, 3)
    probs[torch.arange(n), pred] = top
    features = stack_features(torch.log(probs), [torch.log(probs)])
    edge_right = top > 0.5
    lam, cv = choose_lambda(features, edge_right, torch.ones(n, dtype=torch.bool), [1.0, 0.01])
    assert lam == INF
    assert cv[INF] == pytest.approx(max(cv.values()))


def test_router_scores_use_no_labels_of_the_scored_inputs() -> None:
    # Two routers fitted on the same training data score new inputs identically whatever
    # those inputs' labels are: forward takes only the input and the edge's logits.
    train, edge_train, cloud_train = _synthetic(200, seed=0)
    mean, std, w = fit_stacked(train, cloud_train.double() - edge_train.double(), 0.1)
    router = StackedRouter([], num_classes=3)
    router.set_fit(mean, std, w)
    logits = torch.log(torch.softmax(torch.randn(50, 3), dim=1))
    a = router(torch.zeros(50, 1), logits)
    b = router(torch.ones(50, 1), logits)  # no fold edges: the input itself is not read
    assert torch.equal(a, b)
    torch.testing.assert_close(a, stacked_scores(stack_features(logits, []), mean, std, w))


def test_stacked_design_needs_cross_fitting_and_no_rounds() -> None:
    with pytest.raises(ConfigError, match=r"train\.rounds"):
        load_hybrid_config("digits", ["router.design=stacked", "train.rounds=1"])
    with pytest.raises(ConfigError, match=r"data\.router_fraction"):
        load_hybrid_config(
            "digits", ["router.design=stacked", "train.rounds=0", "data.router_fraction=0.2"]
        )
    with pytest.raises(ConfigError, match="stack_lambdas"):
        load_hybrid_config(
            "digits", ["router.design=stacked", "train.rounds=0", "router.stack_lambdas=[-1]"]
        )


def test_rounds_default_follows_the_design() -> None:
    # Stacked is the default and is fitted once; the paper's design keeps its alternating
    # round unless rounds is set.
    cfg = load_hybrid_config("digits")
    assert (cfg.router.design, cfg.train.rounds) == ("stacked", 0)
    assert load_hybrid_config("digits", ["router.design=paper"]).train.rounds == 1
    assert load_hybrid_config("digits", ["router.design=gain"]).train.rounds == 0
    paper = load_hybrid_config("digits", ["router.design=paper", "train.rounds=2"])
    assert paper.train.rounds == 2


TINY_STACKED = [
    "router.design=stacked",
    "train.rounds=0",
    "train.edge_epochs=2",
    "train.cloud_epochs=2",
    "edge.hidden=[8]",
    "cloud.hidden=[8]",
    "cloud.channels=[4]",
]


def test_stacked_run_trains_saves_and_loads(tmp_path: Path) -> None:
    cfg = load_hybrid_config("digits", TINY_STACKED)
    run = train_hybrid(cfg, progress=False)
    assert len(run.models.router.fold_edges) == cfg.router.folds
    assert run.info["stacked"]["lambda"] in {"inf", *cfg.router.stack_lambdas}
    # The fold edges run beside the edge: their FLOPs are the router's.
    assert run.info["flops"]["router"] >= cfg.router.folds * run.info["flops"]["edge"]
    save_run(run, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    x = load_splits(cfg).test[0][:40]
    a, b = edge_scores(run.models, x), edge_scores(loaded.models, x)
    assert torch.equal(a.scores["router"], b.scores["router"])


def test_training_never_reads_the_test_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same run trained on a dataset whose test labels are scrambled has bit-identical
    # router weights and calibration scores: the router's ordering of any input is fixed
    # before a test label is seen.
    cfg = load_hybrid_config("digits", TINY_STACKED)
    honest = train_hybrid(cfg, progress=False)
    honest_labels = load_splits(cfg).test[1]
    original = train_module.load_dataset

    def scrambled(*args: object, **kwargs: object) -> object:
        ds = original(*args, **kwargs)
        return dataclasses.replace(ds, y_test=(ds.y_test + 1) % ds.num_classes)

    monkeypatch.setattr(train_module, "load_dataset", scrambled)
    assert not torch.equal(load_splits(cfg).test[1], honest_labels)  # every label changed
    blind = train_hybrid(cfg, progress=False)
    for key, value in honest.models.router.state_dict().items():
        assert torch.equal(value, blind.models.router.state_dict()[key]), key
    for method, scores in honest.calibration.val_scores.items():
        assert torch.equal(scores, blind.calibration.val_scores[method]), method
