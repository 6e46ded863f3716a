"""FL algorithms: formulas on hand-computed values, staleness cutoff, buffer semantics,
sample weighting, adaptation direction, registry errors."""

from __future__ import annotations

import math

import pytest
import torch

from dlion.core.errors import ConfigError
from dlion.fl import ALGORITHMS, build_algorithm
from dlion.fl import fedasmu as asmu
from dlion.fl.base import ServerState, Update
from dlion.fl.config import load_fl_config
from dlion.fl.fedasync import staleness_weight
from dlion.fl.fedavg import weighted_average


def _update(
    client: int, version: int, base: torch.Tensor, weights: torch.Tensor, n: int = 1, **meta: float
) -> Update:
    return Update(client, version, weights - base, weights, n, dict(meta))


# ----------------------------------------------------------------------------- FedASMU

# The hand computations below use these initial values (not the shipped defaults).
OLD = {"lambda0": 1.0, "sigma0": 0.5, "iota0": 0.05, "gamma0": 4.0, "nu0": 0.5, "mu": 1.0}


def test_xi_and_alpha_hand_computed() -> None:
    # lambda=1, sigma=0.5, iota=0.05, t=4, o=1: 1 / (sqrt(4) * 4 ** 0.5) + 0.05 = 0.25 + 0.05
    x = asmu.xi(1.0, 0.5, 0.05, t=4, o=1)
    assert x == pytest.approx(0.30)
    # mu=2: alpha = 0.6 / 1.6 = 0.375
    assert asmu.alpha(2.0, x) == pytest.approx(0.375)
    # lambda=2, sigma=1, iota=0.1, t=9, o=7: 2 / (3 * 3) + 0.1 = 0.3222...
    assert asmu.xi(2.0, 1.0, 0.1, t=9, o=7) == pytest.approx(2 / 9 + 0.1)


def test_phi_and_beta_hand_computed() -> None:
    # gamma=4, nu=0.5, t'=16, o=13: (4 / 4) * (1 - 0.5 / sqrt(4)) = 0.75; mu=1: 0.75/1.75
    p = asmu.phi(4.0, 0.5, t_fresh=16, o=13)
    assert p == pytest.approx(0.75)
    assert asmu.beta(1.0, p) == pytest.approx(0.75 / 1.75)
    # nu larger than sqrt(t'-o+1): phi < 0, no merge
    assert asmu.phi(1.0, 2.0, t_fresh=5, o=4) < 0
    assert asmu.beta(1.0, asmu.phi(1.0, 2.0, t_fresh=5, o=4)) == 0.0


def test_fedasmu_merge_uses_alpha() -> None:
    algo = build_algorithm("fedasmu", {**OLD, "adapt": False, "mu": 2.0}, num_clients=3)
    state = ServerState(torch.zeros(4), version=3)
    w = torch.ones(4)
    assert algo.merge(state, _update(1, 1, torch.zeros(4), w)) == "merged"
    # t = 4, o = 1: alpha = 0.375 (as above, lambda0=1, sigma0=0.5, iota0=0.05)
    assert torch.allclose(state.model, torch.full((4,), 0.375))
    assert state.version == 4


def test_fedasmu_staleness_cutoff_tau() -> None:
    algo = build_algorithm("fedasmu", {"tau": 3}, num_clients=2)
    state = ServerState(torch.zeros(3), version=5)
    before = state.model.clone()
    # t = 6, o = 2: staleness 4 > tau = 3: dropped, model and version untouched
    assert algo.merge(state, _update(1, 2, torch.zeros(3), torch.ones(3))) == "stale"
    assert torch.equal(state.model, before) and state.version == 5
    # o = 3: staleness 3 == tau: merged
    assert algo.merge(state, _update(1, 3, torch.zeros(3), torch.ones(3))) == "merged"


def test_fedasmu_noserver_uses_static_polynomial_weight() -> None:
    algo = build_algorithm("fedasmu-noserver", {}, num_clients=2)
    state = ServerState(torch.zeros(2), version=2)
    algo.merge(state, _update(1, 0, torch.zeros(2), torch.ones(2)))
    # t = 3, o = 0: 0.5 * 4 ** -0.5 = 0.25
    assert torch.allclose(state.model, torch.full((2,), 0.25))


def test_fedasmu_ablations_switch_parts_off() -> None:
    nodevice = build_algorithm("fedasmu-nodevice", {}, 2)
    assert nodevice.pull_step({}, steps=10) is None
    assert nodevice.task_meta(1) == {}
    full = build_algorithm("fedasmu", {**OLD, "pull_fraction": 0.5}, 2)
    assert full.pull_step({}, steps=10) == 5
    assert full.task_meta(1) == {"gamma": 4.0, "nu": 0.5}
    with pytest.raises(ConfigError, match="fedasmu-nodevice fixes it"):
        build_algorithm("fedasmu-nodevice", {"device": True}, 2)


def test_device_beta_from_task_meta() -> None:
    algo = build_algorithm("fedasmu", {"mu": 1.0}, 2)
    meta = {"gamma": 4.0, "nu": 0.5}
    assert algo.device_beta(meta, 16, 13) == pytest.approx(0.75 / 1.75)
    assert algo.device_beta(meta, 13, 13) == 0.0  # nothing new: no merge


def test_fedasmu_adaptation_follows_the_loss_change() -> None:
    algo = build_algorithm("fedasmu", {**OLD, "eta": 0.1}, num_clients=2)
    assert isinstance(algo, asmu.FedASMU)
    losses = iter([1.0, 0.5, 1.0, 1.5])  # merge 1 helps (client 1), merge 2 hurts (client 2)
    state = ServerState(torch.zeros(2), probe_loss=lambda: next(losses))
    algo.merge(state, _update(1, 0, torch.zeros(2), torch.ones(2), pulled=0.3))
    algo.merge(state, _update(2, 1, torch.zeros(2), torch.ones(2), pulled=0.0))
    p = algo.params
    assert p["lambda"][1] > 1.0 and p["iota"][1] > 0.05 and p["sigma"][1] < 0.5
    assert p["gamma"][1] > 4.0 and p["nu"][1] < 0.5  # it pulled, and the merge helped
    assert p["lambda"][2] < 1.0 and p["iota"][2] < 0.05 and p["sigma"][2] > 0.5
    assert p["gamma"][2] == 4.0 and p["nu"][2] == 0.5  # it did not pull: untouched
    # r1 = -0.5 is the first |r|: g = -1, lambda_1 = exp(0.1)
    assert float(p["lambda"][1]) == pytest.approx(math.exp(0.1))


def test_fedasmu_state_roundtrip() -> None:
    a = build_algorithm("fedasmu", {}, 3)
    assert isinstance(a, asmu.FedASMU)
    a.params["lambda"][2] = 7.0
    b = build_algorithm("fedasmu", {}, 3)
    b.load_state_tensors(a.state_tensors())
    assert float(b.params["lambda"][2]) == 7.0  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- FedAsync


def test_fedasync_polynomial_staleness() -> None:
    assert staleness_weight(0.6, 0.5, t=10, o=7) == pytest.approx(0.6 * 4**-0.5)
    algo = build_algorithm("fedasync", {"a": 0.6, "p": 1.0}, 2)
    state = ServerState(torch.zeros(2), version=4)
    algo.merge(state, _update(1, 3, torch.zeros(2), torch.full((2,), 2.0)))
    # t = 5, o = 3: a_t = 0.6 / 3 = 0.2 -> 0.8 * 0 + 0.2 * 2
    assert torch.allclose(state.model, torch.full((2,), 0.4))
    assert state.version == 5


def test_fedasync_tau() -> None:
    algo = build_algorithm("fedasync", {"tau": 2}, 2)
    state = ServerState(torch.zeros(2), version=4)
    assert algo.merge(state, _update(1, 1, torch.zeros(2), torch.ones(2))) == "stale"
    assert state.version == 4


# ----------------------------------------------------------------------------- FedBuff


def test_fedbuff_applies_only_when_k_deltas_are_buffered() -> None:
    algo = build_algorithm("fedbuff", {"k": 3, "server_lr": 0.5, "p": 1.0}, 4)
    state = ServerState(torch.zeros(2), version=2)
    base = torch.zeros(2)
    # staleness weights: elapsed 0 -> 1, elapsed 1 -> 1/2, elapsed 2 -> 1/3
    assert algo.merge(state, _update(1, 2, base, torch.full((2,), 3.0))) == "buffered"
    assert algo.merge(state, _update(2, 1, base, torch.full((2,), 4.0))) == "buffered"
    assert torch.equal(state.model, torch.zeros(2)) and state.version == 2
    assert algo.merge(state, _update(3, 0, base, torch.full((2,), 6.0))) == "merged"
    # buffer = 3 + 4/2 + 6/3 = 7; w += 0.5 * 7 / 3
    assert torch.allclose(state.model, torch.full((2,), 0.5 * 7 / 3))
    assert state.version == 3
    # the buffer starts empty again
    assert algo.merge(state, _update(1, 3, base, torch.ones(2))) == "buffered"
    assert state.version == 3


def test_fedbuff_drops_stale_deltas() -> None:
    algo = build_algorithm("fedbuff", {"k": 1, "tau": 1}, 2)
    state = ServerState(torch.zeros(2), version=5)
    assert algo.merge(state, _update(1, 3, torch.zeros(2), torch.ones(2))) == "stale"
    assert algo.merge(state, _update(1, 4, torch.zeros(2), torch.ones(2))) == "merged"


# ----------------------------------------------------------------------------- FedAvg


def test_fedavg_weights_by_sample_count() -> None:
    out = weighted_average([torch.tensor([0.0]), torch.tensor([4.0])], [30, 10])
    assert torch.allclose(out, torch.tensor([1.0]))
    algo = build_algorithm("fedavg", {}, 3)
    state = ServerState(torch.zeros(1), version=0)
    ups = [
        _update(1, 0, torch.zeros(1), torch.tensor([2.0]), n=1),
        _update(2, 0, torch.zeros(1), torch.tensor([6.0]), n=3),
    ]
    algo.aggregate_round(state, ups)
    assert torch.allclose(state.model, torch.tensor([5.0])) and state.version == 1
    algo.aggregate_round(state, [])  # everyone vanished: nothing changes
    assert state.version == 1


def test_registry_and_option_errors() -> None:
    assert set(ALGORITHMS) >= {
        "fedavg",
        "fedasync",
        "fedbuff",
        "fedasmu",
        "fedasmu-noserver",
        "fedasmu-nodevice",
    }
    with pytest.raises(ConfigError, match="unknown FL algorithm 'fedsgd'"):
        build_algorithm("fedsgd", {}, 2)
    with pytest.raises(ConfigError, match=r"algorithm.options.k"):
        build_algorithm("fedbuff", {"k": 0}, 2)
    with pytest.raises(ConfigError, match=r"algorithm.options.bogus"):
        build_algorithm("fedasync", {"bogus": 1}, 2)


def test_algorithm_options_are_checked_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"^algorithm.options.bogus: .*\(algorithm fedasmu\)$"):
        load_fl_config("fl-digits", ["algorithm.options.bogus=1"])
    with pytest.raises(ConfigError, match=r"^algorithm.options.server: fedasmu-noserver fixes"):
        load_fl_config(
            "fl-digits", ["algorithm.name=fedasmu-noserver", "algorithm.options.server=true"]
        )
    with pytest.raises(ConfigError, match="unknown FL algorithm 'fedsgd'"):
        load_fl_config("fl-digits", ["algorithm.name=fedsgd"])
