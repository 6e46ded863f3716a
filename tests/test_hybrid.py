"""Tests for dlion.hybrid (selective query): proxy labels, router features, router loss,
latency formula, calibration, models, and saved runs (round trip, tampered files)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dlion.core.errors import BadInput, ConfigError
from dlion.hybrid.calibrate import (
    Calibration,
    check_coverage,
    keep_mask,
    send_top_fraction,
    threshold_for_coverage,
)
from dlion.hybrid.config import LatencyConfig, ModelSpec, load_hybrid_config
from dlion.hybrid.evaluate import evaluate, no_loss_point
from dlion.hybrid.inference import edge_scores
from dlion.hybrid.latency import (
    build_latency_model,
    expected_latency,
    forward_flops,
    uplink_seconds,
)
from dlion.hybrid.models import (
    REGISTRY,
    Downsample,
    build_hybrid_model,
    register_model,
)
from dlion.hybrid.proxy import (
    entropy,
    oracle_scores,
    proxy_labels,
    router_features,
    top_k_margins,
)
from dlion.hybrid.router import router_loss
from dlion.hybrid.store import HybridRun, load_run, save_run
from dlion.hybrid.train import load_splits, train_hybrid

# A digits run small enough to train in a couple of seconds; the paper's router with its
# alternating round (the default stacked design is trained in test_hybrid_stacked.py and by
# the CLI tests).
TINY = [
    "router.design=paper",
    "train.edge_epochs=2",
    "train.cloud_epochs=2",
    "train.round_edge_epochs=1",
    "router.epochs=3",
    "edge.hidden=[8]",
    "cloud.hidden=[8]",
    "cloud.channels=[4]",
    "router.hidden=[8]",
]


# ----------------------------------------------------------------------------- proxy labels


def test_proxy_labels_send_only_when_edge_wrong_and_cloud_right() -> None:
    # (edge right, cloud right) -> label, as PAPERS.md section 4 defines it.
    table = [
        (True, True, 0.0),  # edge right: keep
        (True, False, 0.0),  # edge right, cloud wrong: keep
        (False, True, 1.0),  # only the cloud is right: send
        (False, False, 0.0),  # both wrong: sending does not help, keep
    ]
    edge = torch.tensor([e for e, _, _ in table])
    cloud = torch.tensor([c for _, c, _ in table])
    assert proxy_labels(edge, cloud).tolist() == [label for _, _, label in table]
    # The oracle sends the cloud-fixes first and the cloud-breaks last.
    assert oracle_scores(edge, cloud).tolist() == [0.0, -1.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- router features


def test_entropy_on_hand_computed_probabilities() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert entropy(probs).tolist() == pytest.approx([0.0, math.log(2), math.log(4)], abs=1e-6)


def test_top_k_margins_sort_the_probabilities() -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.7, 0.1, 0.1, 0.1]])
    torch.testing.assert_close(top_k_margins(probs, 3), torch.tensor([[0.2, 0.3], [0.6, 0.6]]))
    torch.testing.assert_close(top_k_margins(probs, 2), torch.tensor([[0.2], [0.6]]))
    with pytest.raises(ConfigError, match=r"router\.top_k"):
        top_k_margins(probs, 5)


def test_router_features_are_features_entropy_then_margins() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    logits = torch.log(probs) + 7.0  # a shift leaves the softmax unchanged
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = router_features(features, logits, top_k=3)
    h0 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    expected = [[1.0, 2.0, h0, 0.2, 0.3], [3.0, 4.0, math.log(3), 0.0, 0.0]]
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-5, rtol=0)


def test_router_loss_is_bce_plus_coverage_shortfall_squared() -> None:
    logits = torch.zeros(4)  # keep-probability 0.5 each, BCE ln 2 whatever the label
    proxy = torch.tensor([0.0, 1.0, 0.0, 1.0])
    # train_coverage 0.8: shortfall 0.3, penalty 2 * 0.09.
    assert float(router_loss(logits, proxy, 0.8, 2.0)) == pytest.approx(math.log(2) + 0.18)
    # No penalty when the router keeps at least the target share.
    assert float(router_loss(logits, proxy, 0.4, 2.0)) == pytest.approx(math.log(2))


# ----------------------------------------------------------------------------- latency


def test_latency_formula_on_hand_computed_numbers() -> None:
    # edge 1 ms + (1 - 0.8) * (20 ms uplink + 5 ms cloud) = 6 ms
    assert expected_latency(0.001, 0.020, 0.005, 0.8) == pytest.approx(0.006)
    assert expected_latency(0.001, 0.020, 0.005, 1.0) == pytest.approx(0.001)
    # 1000 bytes over 1 Mbit/s = 8 ms, plus 20 ms latency
    assert uplink_seconds(1000, 1.0, 20.0) == pytest.approx(0.028)


def test_latency_model_from_flops_and_config() -> None:
    cfg = LatencyConfig(
        edge_gflops=0.1,
        uplink_mbps=2.0,
        uplink_latency_ms=10.0,
        bytes_per_value=4.0,
        cloud_gflops=10.0,
        cloud_overhead_ms=1.0,
    )
    lat = build_latency_model(
        cfg, edge_flops=1_000_000, router_flops=100_000, cloud_flops=50_000_000, input_values=250
    )
    assert lat.edge_model_s == pytest.approx(0.010)  # 1e6 / 1e8
    assert lat.edge_s == pytest.approx(0.011)  # + router 1e5 / 1e8
    assert lat.uplink_s == pytest.approx(0.010 + 1000 * 8 / 2e6)  # 250 values x 4 bytes
    assert lat.cloud_s == pytest.approx(0.005 + 0.001)
    assert lat.cloud_only() == pytest.approx(0.010 + 0.004 + 0.006)
    assert lat.hybrid(0.75) == pytest.approx(0.011 + 0.25 * 0.020)


def test_forward_flops_counts_one_inference_pass() -> None:
    assert forward_flops(nn.Linear(10, 5), (10,)) == 2 * 10 * 5


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("coverage", [0.5, 0.6, 0.7, 0.8, 0.9])
def test_calibration_reaches_coverage_within_two_points(coverage: float) -> None:
    generator = torch.Generator().manual_seed(7)
    val = torch.randn(20_000, generator=generator)
    test = torch.randn(20_000, generator=generator)
    threshold = threshold_for_coverage(val, coverage)
    assert float(keep_mask(val, threshold).float().mean()) == pytest.approx(coverage)
    assert abs(float(keep_mask(test, threshold).float().mean()) - coverage) <= 0.02


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=200, unique=True
    ),
    coverage=st.floats(0.01, 1.0),
)
def test_threshold_keeps_exactly_the_rounded_share_of_distinct_scores(
    scores: list[float], coverage: float
) -> None:
    val = torch.tensor(scores, dtype=torch.float32)
    kept = int(keep_mask(val, threshold_for_coverage(val, coverage)).sum())
    assert kept == min(len(scores), round(coverage * len(scores)))


def test_send_top_fraction_sends_the_highest_scores() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7])
    assert send_top_fraction(scores, 0.5).tolist() == [True, False, True, False]
    assert send_top_fraction(scores, 1.0).all()
    assert not send_top_fraction(scores, 0.0).any()


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, float("nan"), float("inf"), True, "0.5"])
def test_coverage_outside_zero_one_is_bad_input(bad: object) -> None:
    with pytest.raises(BadInput, match="coverage"):
        check_coverage(bad)  # type: ignore[arg-type]


def test_calibration_json_is_validated() -> None:
    good = Calibration.from_json({"router": [0.1, 0.2]}, "c.json")
    assert good.threshold("router", 0.5) == pytest.approx(0.15)
    for bad in ([], {}, {"router": []}, {"router": ["x"]}, {"router": [1e400]}):
        with pytest.raises(BadInput, match=r"c\.json"):
            Calibration.from_json(bad, "c.json")
    with pytest.raises(BadInput, match="no scores"):
        good.threshold("entropy", 0.5)


def test_no_loss_point_is_the_highest_coverage_within_half_a_point() -> None:
    from dlion.hybrid.evaluate import Point

    curve = [
        Point("router", c, c, acc, 1 - c, 0.001 + (1 - c) * 0.02)
        for c, acc in [(0.0, 0.95), (0.5, 0.949), (0.6, 0.9451), (0.7, 0.94), (1.0, 0.9)]
    ]
    p = no_loss_point(curve, cloud_accuracy=0.95, cloud_latency=0.02)
    assert p.coverage == 0.6
    assert p.latency_reduction == pytest.approx(1 - (0.001 + 0.4 * 0.02) / 0.02)


# ----------------------------------------------------------------------------- models


def test_downsample_average_pools_each_spatial_axis() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert Downsample(2)(x).tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]
    assert Downsample(2)(torch.tensor([[[1.0, 3.0, 5.0, 7.0]]])).tolist() == [[[2.0, 6.0]]]


def test_user_model_plugs_in_by_name() -> None:
    def tiny(shape: tuple[int, ...], classes: int, spec: ModelSpec, seed: int) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(shape), 5), nn.ReLU(), nn.Linear(5, classes)
        )

    register_model("tiny-test", tiny)
    try:
        cfg = load_hybrid_config("digits", ["edge.name=tiny-test"])
        model = build_hybrid_model(cfg.edge, (1, 8, 8), 10, 0, "edge")
        features, logits = model.features_and_logits(torch.zeros(3, 1, 8, 8))
        assert features.shape == (3, 5) and logits.shape == (3, 10)  # 4x4 after the pool
    finally:
        del REGISTRY["tiny-test"]
    with pytest.raises(ConfigError, match=r"edge\.name: unknown model 'tiny-test'"):
        load_hybrid_config("digits", ["edge.name=tiny-test"])
    # module:function names are imported.
    cfg = load_hybrid_config("digits", ["cloud.name=dlion.hybrid.models:_mlp"])
    assert cfg.cloud.name == "dlion.hybrid.models:_mlp"
    with pytest.raises(ConfigError, match=r"cloud\.name: cannot import"):
        load_hybrid_config("digits", ["cloud.name=no_such_module_xyz:build"])


# ----------------------------------------------------------------------------- saved runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[HybridRun, Path]:
    cfg = load_hybrid_config("digits", TINY)
    run = train_hybrid(cfg, progress=False)
    run_dir = tmp_path_factory.mktemp("hybrid") / "run"
    save_run(run, run_dir)
    return run, run_dir


def test_save_load_round_trip_is_bit_exact(trained: tuple[HybridRun, Path]) -> None:
    run, run_dir = trained
    loaded = load_run(run_dir)
    for role in ("edge", "router", "cloud"):
        before = getattr(run.models, role).state_dict()
        after = getattr(loaded.models, role).state_dict()
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), f"{role}.{key}"
    for method, scores in run.calibration.val_scores.items():
        assert torch.equal(scores, loaded.calibration.val_scores[method])
    assert loaded.latency == run.latency
    assert loaded.cfg == run.cfg
    x = load_splits(run.cfg).test[0][:50]
    a, b = edge_scores(run.models, x), edge_scores(loaded.models, x)
    assert torch.equal(a.scores["router"], b.scores["router"])


def test_evaluation_has_every_method_and_the_oracle_bounds_them(
    trained: tuple[HybridRun, Path],
) -> None:
    run, _ = trained
    x, y = load_splits(run.cfg).test
    ev = evaluate(run, x, y, [0.7])
    oracle = ev.point("oracle", 0.7)
    assert oracle.coverage == pytest.approx(0.7, abs=1 / len(y))
    for method in ("router", "entropy", "max_softmax"):
        p = ev.point(method, 0.7)
        assert abs(p.coverage - 0.7) < 0.1
        assert p.cloud_fraction == pytest.approx(1 - p.coverage)
        # Oracle at the same share is an upper bound on any router's accuracy.
        sweep = min(ev.curves[method], key=lambda q: abs(q.coverage - 0.7))
        assert sweep.accuracy <= oracle.accuracy + 1e-9
    cloud = ev.point("cloud-only", None)
    assert cloud.latency_s == pytest.approx(run.latency.cloud_only())


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip", "checksum mismatch"),
        ("truncate", "not a valid safetensors file"),
        ("empty", "not a valid safetensors file"),
        ("delete", "missing weights file"),
    ],
)
def test_damaged_weights_are_refused(
    trained: tuple[HybridRun, Path], tmp_path: Path, damage: str, message: str
) -> None:
    run_dir = _copy_run(trained[1], tmp_path / "run")
    path = run_dir / "edge.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x40  # a weight's bits, after the header
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(BadInput, match=message):
        load_run(run_dir)


def test_weights_of_another_run_are_refused(
    trained: tuple[HybridRun, Path], tmp_path: Path
) -> None:
    other_cfg = load_hybrid_config("digits", [*TINY, "router.hidden=[4]", "router.epochs=1"])
    other = train_hybrid(other_cfg, progress=False)
    save_run(other, tmp_path / "other")
    run_dir = _copy_run(trained[1], tmp_path / "run")
    (run_dir / "router.safetensors").write_bytes(
        (tmp_path / "other/router.safetensors").read_bytes()
    )
    with pytest.raises(BadInput, match="belong to another run"):
        load_run(run_dir)


def test_edited_calibration_and_config_are_refused(
    trained: tuple[HybridRun, Path], tmp_path: Path
) -> None:
    run_dir = _copy_run(trained[1], tmp_path / "run")
    cal = run_dir / "calibration.json"
    cal.write_text(cal.read_text().replace("[", "[0.0, ", 1))
    with pytest.raises(BadInput, match=r"calibration\.json: checksum mismatch"):
        load_run(run_dir)
    run_dir = _copy_run(trained[1], tmp_path / "run2")
    cfg = run_dir / "config.yaml"
    cfg.write_text(cfg.read_text().replace("seed: 0", "seed: 1"))
    with pytest.raises(BadInput, match=r"does not match run\.json"):
        load_run(run_dir)
