"""Transfer pipeline: latent regression, early stopping, frozen heads, the end-to-end run."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dlion.core.errors import ConfigError, DataError
from dlion.transfer.config import (
    RegressionSection,
    TransferConfig,
    load_transfer_config,
    transfer_config_from_dict,
)
from dlion.transfer.pipeline import (
    accuracy,
    balanced_draw,
    labels_to_match,
    load_data,
    mse,
    regress_latent,
    run_transfer,
    split_roles,
)
from dlion.transfer.weights import HEAD_WEIGHTS, TARGET_WEIGHTS, load_target_classifier

# A small but real problem: a few seconds on a loaded 2-core machine.
TINY = [
    "data.synthetic.num_samples=2500",
    "labels.ks=[10,50]",
    "labels.head_steps=150",
    "labels.scratch_steps=100",
    "labels.scratch_epochs=5",
    "source_train.epochs=12",
    "regression.max_epochs=30",
    "regression.patience=5",
    "model.conv_channels=[16,16]",
    "model.mlp_hidden=[64]",
]


def tiny_config(*extra: str) -> TransferConfig:
    return load_transfer_config("synthetic", [*TINY, *extra])


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- regression


def _linear_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 8, generator=g)
    w = torch.randn(8, 4, generator=g)
    return x, x @ w


def test_latent_regression_reduces_mse() -> None:
    x, z = _linear_problem()
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = RegressionSection(max_epochs=30, batch_size=32, lr=1e-2, patience=30)
    result = regress_latent(encoder, x[:300], z[:300], x[300:], z[300:], cfg, seed=0)
    assert result.best_val_mse < 0.1 * result.initial_val_mse
    assert result.train_mse[-1] < result.train_mse[0]
    assert math.isclose(mse(encoder, x[300:], z[300:]), result.best_val_mse, rel_tol=1e-6)


def test_early_stopping_restores_best_epoch() -> None:
    # Training pulls the map towards 2W while validation wants W: starting from zero, the
    # validation MSE falls until the weights pass W, then rises; the best epoch lies between.
    x, z = _linear_problem()
    encoder = nn.Linear(8, 4, bias=False)
    nn.init.zeros_(encoder.weight)
    cfg = RegressionSection(max_epochs=200, batch_size=50, lr=5e-3, patience=3, weight_decay=0)
    result = regress_latent(encoder, x[:300], 2 * z[:300], x[300:], z[300:], cfg, seed=0)
    assert result.stopped_early
    assert 1 <= result.best_epoch < len(result.val_mse) == result.best_epoch + cfg.patience
    assert result.best_val_mse == min(result.val_mse)
    assert result.val_mse[-1] > result.best_val_mse
    # The encoder holds the best epoch's weights, not the last epoch's.
    assert math.isclose(mse(encoder, x[300:], z[300:]), result.best_val_mse, rel_tol=1e-6)


def test_regression_that_never_improves_is_an_error() -> None:
    x, z = _linear_problem()
    encoder = nn.Linear(8, 4)
    nn.init.zeros_(encoder.weight)
    nn.init.zeros_(encoder.bias)
    # Validation targets are unrelated noise: any move away from zero makes them worse.
    noise = torch.randn(100, 4, generator=torch.Generator().manual_seed(1))
    cfg = RegressionSection(max_epochs=5, lr=1e-2, patience=2, min_delta=0.5)
    with pytest.raises(DataError, match="never improved"):
        regress_latent(encoder, x[:300], z[:300], x[300:], noise, cfg, seed=0)


# ----------------------------------------------------------------------------- heads


def test_balanced_draw_spreads_over_classes() -> None:
    labels = np.repeat(np.arange(8), 30)
    rng = np.random.default_rng(0)
    idx = balanced_draw(labels, 20, rng)
    counts = np.bincount(labels[idx], minlength=8)
    assert len(set(idx.tolist())) == 20
    assert counts.max() - counts.min() <= 1
    # A class with few samples is used up, and the rest fill the budget.
    skewed = np.array([0] * 2 + [1] * 50)
    assert np.bincount(skewed[balanced_draw(skewed, 10, rng)]).tolist() == [2, 8]
    with pytest.raises(DataError):
        balanced_draw(skewed, 53, rng)


def test_labels_to_match_hand_computed() -> None:
    assert labels_to_match([10, 100], [0.5, 0.7], 0.6) == pytest.approx(math.sqrt(1000))
    assert labels_to_match([10, 100], [0.65, 0.7], 0.6) == 10.0
    assert labels_to_match([10, 100, 1000], [0.2, 0.3, 0.4], 0.6) is None


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"data": {"source": "imu", "target": "imu"}}, "data"),
        ({"labels": {"ks": [50, 10]}}, "labels"),
        ({"labels": {"ks": [10, 20], "match_k": 50}}, "labels"),
        ({"data": {"split": {"source": 0.5, "pairs": 0.5, "test": 0.2}}}, "data.split"),
        ({"data": {"synthetic": {"num_classes": 4}}}, "data.synthetic.num_classes"),
        ({"regression": {"patience": 0}}, "regression.patience"),
        ({"regresion": {}}, "regresion"),
        ({"data": {"unlabeled_path": "u.npz"}}, "data"),
    ],
)
def test_config_errors_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        transfer_config_from_dict(raw, "cfg.yaml")
    assert str(info.value).startswith(f"cfg.yaml: {field}")


def test_unknown_modality_and_small_pool_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="'video'"):
        load_data(tiny_config("data.target=video"))
    cfg = tiny_config("labels.ks=[10,50,400]")
    with pytest.raises(ConfigError, match=r"labels.ks: k=400 needs 400 .* gives 300"):
        split_roles(1500, cfg)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, TransferConfig]:
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    return out, run_transfer(cfg, out_dir=out), cfg


def test_zero_label_transfer_beats_chance(tiny_run: tuple[Path, dict, TransferConfig]) -> None:
    _, summary, _ = tiny_run
    # Measured on this tiny set: chance 0.14, zero-label 0.47, few-label at k=50 0.52.
    assert summary["zero_label_acc"] > 2.5 * summary["chance_acc"]
    assert summary["few_label_acc"][1] > 2.5 * summary["chance_acc"]
    reg = summary["regression"]
    assert reg["best_val_mse"] < 0.5 * reg["initial_val_mse"]
    assert summary["samples"] == {
        "source": 500,
        "pairs": 1125,
        "target_pool": 500,
        "test": 375,
        "extra_unlabeled_pairs": 0,
    }


def test_saved_weights_reload_to_the_same_accuracy(
    tiny_run: tuple[Path, dict, TransferConfig],
) -> None:
    out, summary, cfg = tiny_run
    assert json.loads((out / "summary.json").read_text()) == summary
    data, _ = load_data(cfg)
    test = torch.as_tensor(split_roles(len(data), cfg)["test"])
    x = torch.as_tensor(data.modalities["audio"])[test]
    y = torch.as_tensor(data.labels)[test]
    assert accuracy(load_target_classifier(out), x, y) == pytest.approx(summary["zero_label_acc"])
    few = accuracy(load_target_classifier(out, k=50), x, y)
    assert few == pytest.approx(summary["few_label_acc"][1])
    with pytest.raises(DataError, match="k=7"):
        load_target_classifier(out, k=7)


def test_tampered_weights_are_refused(
    tiny_run: tuple[Path, dict, TransferConfig], tmp_path: Path
) -> None:
    out, _, _ = tiny_run
    for name in ("meta.json", TARGET_WEIGHTS, HEAD_WEIGHTS, "source_model.safetensors"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    weights = tmp_path / TARGET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DataError, match=re.escape(TARGET_WEIGHTS)):
        load_target_classifier(tmp_path)
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(DataError, match=r"meta\.json"):
        load_target_classifier(tmp_path)


def test_same_seed_same_results() -> None:
    cfg = tiny_config(
        "labels.ks=[10]", "labels.match_k=10", "regression.max_epochs=3", "source_train.epochs=2"
    )
    a, b = run_transfer(cfg), run_transfer(cfg)
    assert a == b


def test_source_head_variant_starts_from_the_source_head(tmp_path: Path) -> None:
    # With a vanishing learning rate the fine-tuned copy is the source head: few == zero-label.
    cfg = tiny_config(
        "labels.head=source",
        "labels.ks=[10]",
        "labels.match_k=10",
        "labels.head_steps=1",
        "labels.head_lr=1e-12",
        "source_train.epochs=3",
        "regression.max_epochs=3",
    )
    summary = run_transfer(cfg, out_dir=tmp_path)
    assert summary["few_label_acc"] == [summary["zero_label_acc"]]
    data, _ = load_data(cfg)
    test = torch.as_tensor(split_roles(len(data), cfg)["test"])
    model = load_target_classifier(tmp_path, k=10)
    x, y = torch.as_tensor(data.modalities["audio"])[test], torch.as_tensor(data.labels)[test]
    assert accuracy(model, x, y) == pytest.approx(summary["zero_label_acc"])


def test_user_file_any_direction_and_extra_unlabeled_pairs(tmp_path: Path) -> None:
    from dlion.transfer.data import generate_synthetic, write_multimodal_npz

    data = generate_synthetic(tiny_config().data.synthetic, 5)
    labeled = write_multimodal_npz(tmp_path / "labeled.npz", data)
    unlabeled = data.take(np.arange(200))
    extra = write_multimodal_npz(
        tmp_path / "extra.npz", type(unlabeled)(unlabeled.modalities, None)
    )
    cfg = tiny_config(
        f"data.path={labeled}",
        f"data.unlabeled_path={extra}",
        "data.source=audio",
        "data.target=imu",
        "labels.ks=[10]",
        "labels.match_k=10",
        "regression.max_epochs=3",
        "source_train.epochs=2",
    )
    summary = run_transfer(cfg)
    assert (summary["source"], summary["target"]) == ("audio", "imu")
    assert summary["samples"]["extra_unlabeled_pairs"] == 200
    # Extra pairs whose shape disagrees with the labeled file are refused, naming both files.
    bad = dict(unlabeled.modalities, imu=unlabeled.modalities["imu"][:, :, :32])
    write_multimodal_npz(tmp_path / "extra.npz", type(unlabeled)(bad, None))
    with pytest.raises(DataError, match=r"extra.npz: 'modality_imu' .*labeled.npz"):
        load_data(cfg)
