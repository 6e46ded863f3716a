"""The modern baselines (PAPERS.md section 7): DiLoCo, Streaming DiLoCo, SparseLoCo, HALoS.
Pure rules on hand-computed cases, then one exchange of each in the sim, by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from dlion.cli.suites import Suite, load_suite, run_suite
from dlion.comm.codec import decode, encode, pack_codes, unpack_codes
from dlion.comm.messages import Message, Quantized, quant_levels, tensor_problem
from dlion.core.config import ExperimentConfig, MembershipEvent, with_membership
from dlion.core.errors import ConfigError
from dlion.engines.sim import run_sim
from dlion.strategies import diloco, get_strategy, halos, parse_options, sparseloco
from dlion.strategies import streaming_diloco as sd
from dlion.training.experiment import make_replica, prepare
from helpers import FREE_VECTORS, run_counting, small_config

# ------------------------------------------------------------------------------ DiLoCo


def test_outer_nesterov_by_hand() -> None:
    theta = torch.tensor([1.0, 2.0])
    delta = torch.tensor([0.1, -0.2])
    v = torch.tensor([0.5, 0.0])
    new, v2 = diloco.outer_nesterov(theta, delta, v, lr=0.7, mu=0.9)
    # v' = 0.9 v + delta = [0.55, -0.2]; theta' = theta - 0.7 (delta + 0.9 v')
    assert torch.allclose(v2, torch.tensor([0.55, -0.2]))
    assert torch.allclose(new, torch.tensor([1 - 0.7 * 0.595, 2 + 0.7 * 0.38]))
    assert torch.equal(v, torch.tensor([0.5, 0.0]))  # inputs untouched


def test_outer_nesterov_is_torch_sgd_nesterov() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    theta, v = p.detach().clone(), torch.zeros(5)
    for _ in range(3):
        g = torch.randn(5)
        p.grad = g.clone()
        sgd.step()
        theta, v = diloco.outer_nesterov(theta, g, v, 0.7, 0.9)
    assert torch.allclose(theta, p.detach(), atol=1e-6)


def _two_workers(strategy: str, options: dict[str, Any], iterations: int) -> ExperimentConfig:
    return small_config(
        workers=[{"site": "a", "capacity_gflops": 0.1, "count": 2}],
        strategy=strategy,
        options=options,
        train={"max_iterations": iterations, "max_time": 50.0},
    )


def test_diloco_one_round_by_hand() -> None:
    """H = 3 inner steps each, the outer Nesterov step on the mean pseudo-gradient, then one
    inner step from the new global model (the run stops there)."""
    H = 3
    cfg = _two_workers("diloco", {"H": H}, H + 1)
    result = run_sim(cfg, progress=False)
    prep = prepare(cfg, 2)
    hands = [make_replica(cfg, prep, r) for r in range(2)]
    theta0 = hands[0].params()
    for hand in hands:
        for _ in range(H):
            hand.apply(hand.gradient(16)[0])
    delta = sum((theta0 - hand.flat) * 0.5 for hand in hands)
    theta1, _ = diloco.outer_nesterov(theta0, delta, torch.zeros_like(theta0), 0.7, 0.9)
    for rank, hand in enumerate(hands):
        hand.set_params(theta1)
        hand.apply(hand.gradient(16)[0])  # its inner optimizer state carries over
        assert torch.allclose(result.replicas[rank].flat, hand.flat, atol=1e-6)


def test_diloco_sends_one_allreduce_per_round() -> None:
    few = run_sim(_two_workers("diloco", {"H": 20}, 80), progress=False)
    many = run_sim(_two_workers("diloco", {"H": 5}, 80), progress=False)
    # 3 rounds (the 4th is cut by the stop) against 15: bytes scale with the rounds.
    assert few.summary["bytes_sent"] * 4 < many.summary["bytes_sent"]


# ------------------------------------------------------------------------------ Streaming DiLoCo


def test_strided_fragments_by_hand() -> None:
    frags = sd.strided_fragments([3, 2, 4], 2)
    assert frags[0].tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert frags[1].tolist() == [3, 4]
    with pytest.raises(ValueError, match="fragments: 4, but the model has 3 layers"):
        sd.strided_fragments([3, 2, 4], 4)


def test_layer_sizes_group_weight_and_bias() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    assert sd.layer_sizes(model) == [4 * 3 + 3, 3 * 2]


def test_merge_and_schedule_validation() -> None:
    assert torch.allclose(
        sd.merge(torch.tensor([1.0]), torch.tensor([3.0]), 0.25), torch.tensor([2.5])
    )
    spec = get_strategy("streaming-diloco")
    with pytest.raises(ConfigError, match="multiple of fragments"):
        parse_options(spec, {"H": 5, "fragments": 2})
    with pytest.raises(ConfigError, match="tau"):
        parse_options(spec, {"H": 4, "fragments": 2, "tau": 4})


def test_streaming_diloco_one_fragment_sync_by_hand() -> None:
    """H = 2, P = 2, tau = 0: after inner step 1 fragment 1 (the second layer) is synced
    and merged with alpha = 0.5; inner step 2 starts from the merged model."""
    cfg = _two_workers("streaming-diloco", {"H": 2, "fragments": 2, "tau": 0}, 2)
    result = run_sim(cfg, progress=False)
    prep = prepare(cfg, 2)
    hands = [make_replica(cfg, prep, r) for r in range(2)]
    frag = sd.strided_fragments(sd.layer_sizes(hands[0].model), 2)[1]
    theta0 = hands[0].params()
    for hand in hands:
        hand.apply(hand.gradient(16)[0])
    delta = sum((theta0[frag] - hand.flat[frag]) * 0.5 for hand in hands)
    glob, _ = diloco.outer_nesterov(theta0[frag], delta, torch.zeros_like(delta), 0.7, 0.9)
    for rank, hand in enumerate(hands):
        merged = hand.params()
        merged[frag] = 0.5 * merged[frag] + 0.5 * glob
        hand.set_params(merged)
        hand.apply(hand.gradient(16)[0])
        assert torch.allclose(result.replicas[rank].flat, hand.flat, atol=1e-6)


# ------------------------------------------------------------------------------ SparseLoCo


def test_compress_chunked_top_k_with_two_bit_values_by_hand() -> None:
    e = torch.tensor([0.1, -0.9, 0.3, 0.0, 0.5, 0.05, -0.2, 0.6])
    c = sparseloco.compress(e, density=0.5, chunk=4, bits=2)
    # Chunk [0.1, -0.9, 0.3, 0]: top-2 -0.9, 0.3; scale 0.9; levels -1, -1/3, 1/3, 1 -> codes 0, 2.
    # Chunk [0.5, 0.05, -0.2, 0.6]: top-2 0.5, 0.6; scale 0.6; 0.5/0.6 rounds to level 1.
    assert c.indices.tolist() == [1, 2, 4, 7]
    assert c.codes.tolist() == [0, 2, 3, 3]
    assert torch.allclose(c.scales, torch.tensor([0.9, 0.6]))
    assert torch.allclose(c.to_dense(8), torch.tensor([0, -0.9, 0.3, 0, 0.6, 0, 0, 0.6]))
    # 4 indices x 4 B + 4 values x 2 bits (1 B) + 2 scales x 4 B
    assert c.nbytes == 25


def test_chunks_have_nearly_equal_lengths() -> None:
    assert sparseloco.chunk_bounds(10, 4) == [(0, 4), (4, 7), (7, 10)]
    assert sparseloco.chunk_bounds(3, 4096) == [(0, 3)]


def test_error_feedback_keeps_what_was_not_sent() -> None:
    e = torch.tensor([0.2, 0.0, 0.0, 0.0])
    delta = torch.tensor([1.0, 0.1, -0.1, 0.05])
    sent, kept = sparseloco.error_feedback_step(e, delta, 0.5, 0.25, 4, 2)
    # e' = 0.5 e + delta = [1.1, 0.1, -0.1, 0.05]; top-1 is entry 0 (sent exactly, as the scale).
    assert sent.indices.tolist() == [0] and torch.allclose(sent.values(), torch.tensor([1.1]))
    assert torch.allclose(kept, torch.tensor([0.0, 0.1, -0.1, 0.05]))
    # Nothing is lost: what was sent plus what is kept is the accumulated buffer.
    assert torch.allclose(sent.to_dense(4) + kept, 0.5 * e + delta)


def test_quantization_error_stays_in_the_buffer() -> None:
    e = torch.tensor([0.9, 0.5, 0.0, 0.0])
    sent, kept = sparseloco.error_feedback_step(torch.zeros(4), e, 0.95, 0.5, 4, 2)
    # 0.5 is sent as the level 1/3 of 0.9 (0.3): 0.2 stays behind.
    assert torch.allclose(sent.to_dense(4), torch.tensor([0.9, 0.3, 0.0, 0.0]))
    assert torch.allclose(kept, torch.tensor([0.0, 0.2, 0.0, 0.0]))


def test_mean_update_weights_by_batch() -> None:
    a = sparseloco.compress(torch.tensor([4.0, 0.0]), 0.5, 2, 2)
    b = sparseloco.compress(torch.tensor([0.0, 8.0]), 0.5, 2, 2)
    assert torch.allclose(
        sparseloco.mean_update({1: (b, 48), 0: (a, 16)}), torch.tensor([1.0, 6.0])
    )


def test_sparseloco_one_exchange_by_hand() -> None:
    H = 2
    opts = {"H": H, "density": 0.05, "chunk": 100}
    cfg = _two_workers("sparseloco", opts, H + 1)
    result = run_sim(cfg, progress=False)
    prep = prepare(cfg, 2)
    hands = [make_replica(cfg, prep, r) for r in range(2)]
    theta0 = hands[0].params()
    update = torch.zeros_like(theta0)
    for hand in hands:
        for _ in range(H):
            hand.apply(hand.gradient(16)[0])
        sent = sparseloco.compress(theta0 - hand.flat, 0.05, 100, 2)  # empty buffer: e = Delta
        update += 0.5 * sent.to_dense(theta0.numel())
    for rank, hand in enumerate(hands):
        hand.set_params(theta0 - update)
        hand.apply(hand.gradient(16)[0])
        assert torch.allclose(result.replicas[rank].flat, hand.flat, atol=1e-6)
    # A few percent of the entries crossed the wire, not the dense model.
    assert result.summary["bytes_sent"] < 0.2 * theta0.numel() * 4


# ------------------------------------------------------------------------------ Quantized payload


def test_codes_pack_four_to_a_byte_and_back() -> None:
    codes = torch.tensor([3, 0, 1, 2, 1], dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    assert packed.tolist() == [3 + 0 * 4 + 1 * 16 + 2 * 64, 1]
    assert torch.equal(unpack_codes(packed, 2, 5), codes)
    assert torch.allclose(
        quant_levels(torch.arange(4, dtype=torch.uint8), 2), torch.tensor([-1, -1 / 3, 1 / 3, 1])
    )


def test_quantized_payload_round_trips_through_the_codec() -> None:
    q = sparseloco.compress(torch.randn(50, generator=torch.Generator().manual_seed(1)), 0.1, 16, 2)
    got = decode(encode(Message(0, 1, "q", q, 0.0, {"samples": 16.0})), 1 << 20)
    assert isinstance(got.payload, Quantized)
    assert torch.equal(got.payload.to_dense(50), q.to_dense(50))
    assert got.meta == {"samples": 16.0}


def test_malformed_quantized_payloads_are_rejected() -> None:
    good = sparseloco.compress(torch.arange(8.0), 0.5, 4, 2)
    assert tensor_problem(good, 8) is None
    assert "length" in str(tensor_problem(good, 9))
    bad_code = Quantized(good.indices, good.codes + 4, good.scales, 8, 2, 2)
    assert "2-bit" in str(tensor_problem(bad_code, 8))
    bad_index = Quantized(good.indices + 8, good.codes, good.scales, 8, 2, 2)
    assert "out of range" in str(tensor_problem(bad_index, 8))
    nan = Quantized(good.indices, good.codes, torch.tensor([float("nan"), 1.0]), 8, 2, 2)
    assert "NaN" in str(tensor_problem(nan, 8))


# ------------------------------------------------------------------------------ HALoS


def test_delayed_nesterov_by_hand() -> None:
    dn = halos.DelayedNesterov(torch.tensor([10.0]), lr=0.5, mu=0.9)
    dn.step(torch.tensor([2.0]), delay=2)
    assert torch.allclose(dn.model, torch.tensor([9.5]))  # plain step 0.5 * 2 / 2
    dn.step(torch.tensor([4.0]), delay=2)
    # plain 0.5 * 4 / 2, then m = 3 (the mean), model -= 0.5 * 0.9 * 3: 10 - 2.85, which is
    # one Nesterov step on the mean pseudo-gradient 3.
    assert torch.allclose(dn.model, torch.tensor([7.15]))
    assert torch.allclose(dn.momentum, torch.tensor([3.0]))


def test_lps_merge_keeps_updates_that_arrived_during_the_round_trip() -> None:
    new, ref = halos.lps_merge(torch.tensor([1.0]), torch.tensor([1.5]), torch.tensor([3.0]), 0.75)
    assert torch.allclose(ref, torch.tensor([2.5]))  # 0.25 * 1 + 0.75 * 3
    assert torch.allclose(new, torch.tensor([3.0]))  # plus the 0.5 applied since the push


def test_slower_workers_run_fewer_local_steps() -> None:
    assert halos.local_steps(20, None, None) == 20
    assert halos.local_steps(20, 1.0, 4.0) == 5
    assert halos.local_steps(20, 0.01, 4.0) == 1
    assert halos.local_steps(20, 5.0, 4.0) == 20


def test_halos_lps_applies_a_workers_updates_on_arrival_by_hand() -> None:
    """One site: rank 0 (LPS and GPS) too slow to finish a step, rank 1 sends updates of
    H = 3 steps. The LPS applies each at once (plain step lr g / N, N = 2 site workers),
    the momentum step after every second one; the worker continues from the reply."""
    workers = [{"site": "a", "capacity_gflops": 1e-6}, {"site": "a", "capacity_gflops": 0.1}]
    opts = {"H": 3, "K": 1000, "lps_lr": 0.5, "lps_momentum": 0.9}
    cfg = small_config(
        workers=workers, strategy="t-halos", train={"max_time": 0.3}, engine=FREE_VECTORS
    )
    options = parse_options(get_strategy("halos"), opts)
    result, counts = run_counting(cfg, halos.worker, options)
    assert counts[0] == 0 and counts[1] >= 9
    prep = prepare(cfg, 2)
    hand = make_replica(cfg, prep, 1)
    server = make_replica(cfg, prep, 0).params()
    momentum, pending, arrivals = torch.zeros_like(server), torch.zeros_like(server), 0
    for _ in range(counts[1] // 3):
        for _ in range(3):
            hand.apply(hand.gradient(16)[0])
        g = server - hand.flat
        server = server - 0.5 * g / 2
        pending, arrivals = pending + g, arrivals + 1
        if arrivals == 2:
            momentum = 0.9 * momentum + pending / 2
            server = server - 0.5 * 0.9 * momentum
            pending, arrivals = torch.zeros_like(server), 0
        hand.set_params(server)
    for _ in range(counts[1] % 3):
        hand.apply(hand.gradient(16)[0])
    assert torch.allclose(result.replicas[1].flat, hand.flat, atol=1e-5)


def test_halos_site_server_role_moves_when_its_holder_leaves() -> None:
    cfg = small_config(
        workers=[
            {"site": "a", "capacity_gflops": 0.1, "count": 2},
            {"site": "b", "capacity_gflops": 0.1, "count": 2},
        ],
        sites=[{"name": "a"}, {"name": "b"}],
        links=[{"sites": ["a", "b"], "bandwidth_mbps": 100, "latency_ms": 1}],
        strategy="halos",
        train={"max_time": 2.0, "stop_at_target": False},
    )
    cfg = with_membership(cfg, [MembershipEvent(at_s=0.5, rank=2, event="leave")])
    result = run_sim(cfg, progress=False)
    roles = {(e["rank"], e["role"]) for e in result.events if e["event"] == "halos_role"}
    # Rank 0 serves site a and the cluster; site b's LPS moves from rank 2 to rank 3.
    assert roles == {(0, "lps"), (0, "gps"), (2, "lps"), (3, "lps")}
    late = [p for p in result.points if p.t > 1.0]
    assert late[-1].iteration > late[0].iteration
    assert result.summary["final_acc"] >= 0.85


# ------------------------------------------------------------------------------ suites


def test_a_strategy_searches_its_own_grid_with_its_own_overrides(tmp_path: Path) -> None:
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(
        "name: t\nscenarios: [homogeneous]\n"
        "strategies:\n"
        "  - {label: allreduce, strategy: allreduce}\n"
        "  - label: diloco\n    strategy: diloco\n    set: [train.optimizer=adamw]\n"
        "    grid: [{train.lr: 0.00001, strategy.options.H: 5}, "
        "{train.lr: 0.01, strategy.options.H: 5}]\n"
        "ideal: false\nset: [train.max_time=2.5]\n"
        # The grids as written (extension past an edge is tested in test_bench.py).
        "lr_search: {scenario: homogeneous, grid: [0.01, 0.1], extend: 0}\n"
    )
    _, _, chosen = run_suite(load_suite(str(suite_file)), tmp_path / "out", progress=False)
    entry = chosen["default"]["diloco"]
    assert list(entry["grid"]) == [
        "train.lr=1e-05 strategy.options.H=5",
        "train.lr=0.01 strategy.options.H=5",
    ]
    assert entry["lr"] == 0.01 and entry["set"] == ["train.lr=0.01", "strategy.options.H=5"]
    assert set(chosen["default"]["allreduce"]["grid"]) == {"0.01", "0.1"}
    saved = tmp_path / "out" / "runs" / "homogeneous" / "diloco" / "seed0" / "config.yaml"
    text = saved.read_text()
    assert "name: adamw" in text and "H: 5" in text and "lr: 0.01" in text


def test_a_strategy_grid_must_have_the_same_budget() -> None:
    raw = {
        "name": "t",
        "scenarios": ["homogeneous"],
        "strategies": [{"label": "d", "strategy": "diloco", "grid": [{"train.lr": 0.01}]}],
        "lr_search": {"grid": [0.01, 0.1]},
    }
    with pytest.raises(ValidationError, match="same search budget"):
        Suite.model_validate(raw)
    assert Suite.model_validate({**raw, "lr_search": {"grid": [0.1]}}).strategies[0].grid
