"""CA2FL, FADAS and FedCompass: their rules on hand-computed values."""

from __future__ import annotations

import pytest
import torch

from dlion.core.errors import ConfigError
from dlion.fl import build_algorithm
from dlion.fl import fedcompass as fc
from dlion.fl.base import ServerState, Update
from dlion.fl.fadas import amsgrad_step, delay_adaptive_lr


def _delta(
    client: int, version: int, delta: list[float], elapsed: float = 0.0, **meta: float
) -> Update:
    d = torch.tensor(delta)
    return Update(client, version, d, d.clone(), 1, dict(meta), elapsed)


# ----------------------------------------------------------------------------- CA2FL


def test_ca2fl_calibrates_the_buffer_with_cached_updates() -> None:
    algo = build_algorithm("ca2fl", {"k": 2, "server_lr": 1.0}, num_clients=2)
    state = ServerState(torch.zeros(2))
    # Round 1: nothing cached, v = 0 + ([2, 0] + [0, 4]) / 2 = [1, 2]
    assert algo.merge(state, _delta(1, 0, [2.0, 0.0])) == "buffered"
    assert algo.merge(state, _delta(2, 0, [0.0, 4.0])) == "merged"
    assert torch.allclose(state.model, torch.tensor([1.0, 2.0])) and state.version == 1
    # Cache h1 = [2, 0], h2 = [0, 4]; h = [1, 2]. Round 2: client 1 twice, both against
    # its old cache: ([4, 0] - [2, 0]) + ([0, 2] - [2, 0]) = [0, 2]; v = [1, 2] + [0, 1]
    assert algo.merge(state, _delta(1, 1, [4.0, 0.0])) == "buffered"
    assert algo.merge(state, _delta(1, 1, [0.0, 2.0])) == "merged"
    assert torch.allclose(state.model, torch.tensor([2.0, 5.0])) and state.version == 2
    # The cache now holds client 1's latest delta: h = ([0, 2] + [0, 4]) / 2 = [0, 3]
    assert algo.merge(state, _delta(2, 2, [0.0, 4.0])) == "buffered"
    assert algo.merge(state, _delta(1, 2, [0.0, 2.0])) == "merged"
    # calibrations are zero (each equals its cache): v = h = [0, 3]
    assert torch.allclose(state.model, torch.tensor([2.0, 8.0]))


def test_ca2fl_state_roundtrip_and_tau() -> None:
    a = build_algorithm("ca2fl", {"k": 2, "tau": 1}, num_clients=3)
    state = ServerState(torch.zeros(2), version=5)
    assert a.merge(state, _delta(1, 3, [1.0, 1.0])) == "stale"
    a.merge(state, _delta(1, 5, [1.0, 1.0]))
    a.merge(state, _delta(2, 5, [3.0, 1.0]))
    a.merge(state, _delta(3, 6, [1.0, 1.0]))  # buffered, pending
    b = build_algorithm("ca2fl", {"k": 2}, num_clients=3)
    b.load_state_tensors(a.state_tensors())
    sa, sb = ServerState(state.model.clone(), 6), ServerState(state.model.clone(), 6)
    a.merge(sa, _delta(2, 6, [0.0, 2.0]))
    b.merge(sb, _delta(2, 6, [0.0, 2.0]))
    assert torch.equal(sa.model, sb.model)


# ----------------------------------------------------------------------------- FADAS


def test_fadas_delay_adaptive_lr() -> None:
    assert delay_adaptive_lr(0.5, tau_max=8, tau_c=5) == pytest.approx(0.125)
    assert delay_adaptive_lr(0.5, tau_max=5, tau_c=5) == 0.5  # not above the threshold
    assert delay_adaptive_lr(0.01, tau_max=8, tau_c=5) == 0.01  # 1/8 > eta


def test_amsgrad_step_hand_computed() -> None:
    m, v, vh = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    d = amsgrad_step(m, v, vh, torch.tensor([2.0, -1.0]), 0.9, 0.99, 1e-12)
    # m = [0.2, -0.1], v = [0.04, 0.01], sqrt = [0.2, 0.1]
    assert torch.allclose(d, torch.tensor([1.0, -1.0]))
    d = amsgrad_step(m, v, vh, torch.zeros(2), 0.9, 0.99, 1e-12)
    # m = [0.18, -0.09]; v shrinks to [0.0396, 0.0099] but v_hat keeps [0.04, 0.01]
    assert torch.allclose(vh, torch.tensor([0.04, 0.01]))
    assert torch.allclose(d, torch.tensor([0.9, -0.9]))


def test_fadas_applies_the_buffer_mean_with_the_delay_adaptive_lr() -> None:
    opts = {"k": 2, "server_lr": 0.5, "tau_c": 5, "eps": 1e-12}
    algo = build_algorithm("fadas", opts, num_clients=2)
    state = ServerState(torch.zeros(2), version=10)
    assert algo.merge(state, _delta(1, 2, [1.0, -2.0])) == "buffered"  # delay 8
    assert algo.merge(state, _delta(2, 9, [3.0, 0.0])) == "merged"
    # mean [2, -1]: direction [1, -1]; tau_max = 8 > 5: lr = min(0.5, 1/8)
    assert torch.allclose(state.model, torch.tensor([0.125, -0.125]))
    plain = build_algorithm("fadas", {**opts, "delay_adaptive": False}, num_clients=2)
    s2 = ServerState(torch.zeros(2), version=10)
    plain.merge(s2, _delta(1, 2, [1.0, -2.0]))
    plain.merge(s2, _delta(2, 9, [3.0, 0.0]))
    assert torch.allclose(s2.model, torch.tensor([0.5, -0.5]))


# ----------------------------------------------------------------------------- FedCompass


def test_fedcompass_steps_and_group_choice() -> None:
    # (A - T - c) / s = (10 - 2 - 1) / 0.5 = 14
    assert fc.steps_to_arrive(10.0, 2.0, 1.0, 0.5) == 14
    groups = {0: fc.Group(arrival=10.0, latest=12.0), 1: fc.Group(arrival=5.0, latest=6.0)}
    # group 0 would need 14 > q_max steps; group 1: (5 - 2 - 1) / 0.5 = 4
    assert fc.choose_group(groups, 2.0, 1.0, 0.5, q_min=1, q_max=8) == (1, 4)
    # too late for both (group 1's 4 steps now below q_min = 5): open a new group
    assert fc.choose_group(groups, 2.0, 1.0, 0.5, q_min=5, q_max=8) == (None, 8)
    with pytest.raises(ConfigError, match="q_min"):
        build_algorithm("fedcompass", {"q_min": 9, "q_max": 8}, 2)


def test_fedcompass_groups_arrive_together_and_are_applied_once() -> None:
    algo = build_algorithm("fedcompass", {"q_max": 4, "lam": 1.5, "k": 5}, num_clients=3)
    assert isinstance(algo, fc.FedCompass)
    now = [1.0]
    algo.clock = lambda: now[0]
    state = ServerState(torch.zeros(1))
    assert algo.task_meta(1) == {}  # speed unknown: the default steps
    # client 1: 2 steps in 1.0 s of a 1.6 s task -> 0.5 s/step, 0.6 s communication
    assert algo.merge(state, _delta(1, 0, [1.0], 1.6, steps=2, train_s=1.0)) == "buffered"
    # client 2: 0.25 s/step, 0.1 s communication
    assert algo.merge(state, _delta(2, 0, [3.0], 1.1, steps=4, train_s=1.0)) == "buffered"
    now[0] = 2.0
    # no group yet: a new one, Q_max = 4 steps, A = 2 + 0.6 + 4 * 0.5 = 4.6, L = 2 + 1.5 * 2.6
    assert algo.task_meta(1) == {"steps": 4.0}
    assert algo.groups[0].arrival == pytest.approx(4.6)
    assert algo.groups[0].latest == pytest.approx(5.9)
    now[0] = 3.6
    # client 2 joins group 0: (4.6 - 3.6 - 0.1) / 0.25 = 3.6 -> 3 steps
    assert algo.task_meta(2) == {"steps": 3.0}
    now[0] = 4.6
    assert algo.merge(state, _delta(1, 0, [5.0], 2.6, steps=4, train_s=2.0)) == "buffered"
    assert state.version == 0
    now[0] = 4.7
    assert algo.merge(state, _delta(2, 0, [7.0], 1.1, steps=3, train_s=0.75)) == "merged"
    # the group (5, 7) and the general buffer (1, 3) together, all fresh: mean 4
    assert torch.allclose(state.model, torch.tensor([4.0])) and state.version == 1
    assert not algo.groups and not algo.general


def test_fedcompass_does_not_wait_for_a_member_that_left() -> None:
    algo = build_algorithm("fedcompass", {"q_max": 4, "k": 5}, num_clients=3)
    now = [1.0]
    algo.clock = lambda: now[0]
    state = ServerState(torch.zeros(1))
    algo.merge(state, _delta(1, 0, [2.0], 1.5, steps=2, train_s=1.0))
    algo.merge(state, _delta(2, 0, [2.0], 1.5, steps=2, train_s=1.0))
    now[0] = 2.0
    algo.task_meta(1)
    algo.task_meta(2)  # same speeds: same group
    assert len(algo.groups) == 1
    algo.task_lost(2)
    now[0] = 4.5
    assert algo.merge(state, _delta(1, 0, [8.0], 2.5, steps=4, train_s=2.0)) == "merged"
    assert torch.allclose(state.model, torch.tensor([4.0]))  # (2 + 2 + 8) / 3
