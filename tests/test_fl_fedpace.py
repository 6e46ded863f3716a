"""FedPace: each technique on hand-computed values, and each ablation switching it off."""

from __future__ import annotations

import pytest
import torch

from dlion.fl import ALGORITHMS, build_algorithm
from dlion.fl import fedpace as fp
from dlion.fl.base import ServerState, Update


def _up(
    client: int, version: int, delta: list[float], base: list[float] | None = None, **meta: float
) -> Update:
    d = torch.tensor(delta)
    b = torch.tensor(base) if base is not None else torch.zeros_like(d)
    return Update(client, version, d, b + d, 1, dict(meta), meta.pop("elapsed", 0.0))


def _pace(options: dict[str, object], name: str = "fedpace", concurrency: int = 2) -> fp.FedPace:
    algo = build_algorithm(name, {"adapt": False, **options}, 4, concurrency=concurrency)
    assert isinstance(algo, fp.FedPace)
    return algo


def test_pure_rules_hand_computed() -> None:
    assert fp.staleness_rounds(25, 5, 10) == 2.0
    assert fp.delta_weight(2.0, 3.0, 0.5) == pytest.approx(1.0)  # 2 * 4 ** -0.5
    assert fp.speed_steps(4, step_s=0.1, median_step_s=0.2, cap=4) == 8  # twice as fast
    assert fp.speed_steps(4, step_s=1.0, median_step_s=0.2, cap=4) == 1  # round(0.8)
    assert fp.speed_steps(4, step_s=0.01, median_step_s=0.2, cap=4) == 16  # capped at 4 x 4
    assert fp.speed_steps(2, step_s=10.0, median_step_s=0.2, cap=4) == 1  # never 0
    # lands in time (0.5 < 1) and removes 2 rounds of staleness for 0.5 added
    assert fp.pull_pays(1.0, 2.0, download_s=0.5, remaining_s=1.0, round_s=1.0)
    assert not fp.pull_pays(1.0, 0.3, download_s=0.5, remaining_s=1.0, round_s=1.0)
    assert not fp.pull_pays(1.0, 5.0, download_s=2.0, remaining_s=1.0, round_s=1.0)


def test_buffered_delta_weights_with_staleness_in_rounds() -> None:
    algo = _pace({"k": 2, "server_lr": 1.0, "sigma": 1.0})
    state = ServerState(torch.zeros(2))
    algo.task_meta(1)
    algo.task_meta(2)  # both tasks start at U = 0
    # client 1: no upload since its start, s = 0, weight 1
    assert algo.merge(state, _up(1, 0, [2.0, 2.0])) == "buffered"
    # client 2: one upload since, C = 2: s = 0.5, weight 1 / 1.5
    assert algo.merge(state, _up(2, 0, [3.0, 0.0])) == "merged"
    # w += ([2, 2] + [2, 0]) / 2
    assert torch.allclose(state.model, torch.tensor([2.0, 1.0])) and state.version == 1


def test_staleness_in_rounds_does_not_grow_with_concurrency() -> None:
    # The same client, which waited for one upload of each other client (C - 1 uploads),
    # is (C - 1) / C rounds stale at C = 2 and at C = 20 alike within a round.
    for c in (2, 20):
        algo = _pace({"k": 100}, concurrency=c)
        state = ServerState(torch.zeros(1))
        algo.task_meta(1)
        for _ in range(c - 1):
            algo.merge(state, _up(2, 0, [0.0]))
        s = algo._staleness(1, 0, state.version, algo.uploads, pulled=0.0)
        assert s == pytest.approx((c - 1) / c)
    versions = _pace({"k": 1}, "fedpace-versions")
    assert versions._staleness(1, 3, 10, 0, pulled=0.0) == 7.0  # t - o
    # a pull answered at version 9 with beta 0.5 moves the start to 3 + 0.5 * 6 = 6
    assert versions._staleness(1, 3, 10, 0, pulled=0.5, pull_version=9.0) == 4.0


def test_delta_merge_against_whole_model_mixing() -> None:
    for name, expected in (("fedpace", 3.0), ("fedpace-models", 2.0)):
        algo = _pace({"k": 1, "sigma": 0.0}, name)
        state = ServerState(torch.ones(2))
        algo.task_meta(1)
        # trained from the zero model to [2, 2]; the global model meanwhile moved to 1
        algo.merge(state, _up(1, 0, [2.0, 2.0], base=[0.0, 0.0]))
        # deltas: 1 + 2 = 3; models: 1 + (2 - 1) = 2 (pulled back toward the old start)
        assert torch.allclose(state.model, torch.full((2,), expected)), name
    assert build_algorithm("fedpace", {}, 2).rebase_on_pull
    assert not build_algorithm("fedpace-models", {}, 2).rebase_on_pull


def test_gated_pull_weighs_gain_against_download() -> None:
    algo = _pace({"k": 100})
    state = ServerState(torch.zeros(1), version=1)
    algo.task_meta(1)
    assert not algo.answer_pull(state, 1, 0, {"remaining_s": 10.0})  # nothing measured yet
    algo.comm_s[1] = 1.0  # download 0.5 s
    algo.gap_s = 0.5  # one round = C x 0.5 = 1 s
    algo.uploads = 4  # 2 rounds behind: gain 2 > 0.5
    assert algo.answer_pull(state, 1, 0, {"remaining_s": 1.0})
    assert not algo.answer_pull(state, 1, 0, {"remaining_s": 0.4})  # would land too late
    algo.uploads = 0  # behind by nothing
    assert not algo.answer_pull(state, 1, 0, {"remaining_s": 1.0})
    always = _pace({}, "fedpace-alwayspull")
    always.task_meta(1)
    assert always.answer_pull(state, 1, 0, {})  # the server moved on: answered
    assert not always.answer_pull(state, 1, 1, {})  # it did not
    nopull = _pace({}, "fedpace-nopull")
    assert nopull.pull_step({}, steps=10) is None
    assert _pace({"pull_fraction": 0.5}).pull_step({}, steps=10) == 5


def test_speed_aware_steps_from_measured_speeds() -> None:
    algo = _pace({"k": 100})
    state = ServerState(torch.zeros(1))
    speeds = {1: 0.1, 2: 0.2, 3: 0.4}  # s per step; median 0.2
    for c, s in speeds.items():
        algo.merge(state, _up(c, 0, [0.0], steps=2.0, train_s=2 * s, default_steps=2.0))
    assert algo.task_meta(1) == {"steps": 4.0}
    assert algo.task_meta(2) == {"steps": 2.0}
    assert algo.task_meta(3) == {"steps": 1.0}
    assert algo.task_meta(4) == {}  # never measured: its default steps
    fixed = _pace({"k": 100}, "fedpace-fixedsteps")
    for c, s in speeds.items():
        fixed.merge(state, _up(c, 0, [0.0], steps=2.0, train_s=2 * s, default_steps=2.0))
    assert fixed.task_meta(1) == {}


def test_adaptation_raises_lambda_of_helpful_uploads() -> None:
    algo = build_algorithm("fedpace", {"k": 1, "eta": 0.1}, 3, concurrency=2)
    assert isinstance(algo, fp.FedPace)
    losses = iter([1.0, 0.5, 0.5, 1.0])
    state = ServerState(torch.zeros(1), probe_loss=lambda: next(losses))
    algo.merge(state, _up(1, 0, [1.0]))  # loss fell
    algo.merge(state, _up(2, 1, [1.0]))  # loss rose
    assert float(algo.lam[1]) > 1.0 > float(algo.lam[2])
    restored = build_algorithm("fedpace", {}, 3)
    restored.load_state_tensors(algo.state_tensors())
    assert torch.equal(restored.lam, algo.lam)  # type: ignore[attr-defined]


def test_every_ablation_is_registered_and_pins_one_switch() -> None:
    for suffix, _, fixed in fp.ABLATIONS:
        spec = ALGORITHMS[f"fedpace-{suffix}"]
        assert spec.fixed == fixed and len(fixed) == 1
