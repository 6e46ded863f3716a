"""Performance model fits, planner arithmetic, recommendation rules."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dlion.core.config import load_config
from dlion.core.errors import ConfigError
from dlion.training.experiment import prepare
from dlion.transient.catalog import InstanceType, Revocation, load_catalog
from dlion.transient.perf import (
    StepFeatures,
    StepProfile,
    fit_checkpoint_model,
    fit_step_model,
    measure_checkpoint,
    relative_errors,
    step_features,
)
from dlion.transient.planner import (
    Outcome,
    Workload,
    billed_cost,
    evaluate,
    finish_time,
    pareto_front,
    parse_budget,
    parse_duration,
    recommend,
)
from dlion.transient.revocation import Lease
from dlion.transient.runs import Candidate, cluster_config, model_bytes
from dlion.transient.spec import TransientSpec


def test_step_model_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([1.2, 0.8, 0.5, 0.003])
    profiles = []
    for _ in range(12):
        f = StepFeatures(*rng.uniform(0.001, 0.1, size=3))
        profiles.append(StepProfile(f, float(truth @ f.vector())))
    model = fit_step_model(profiles)
    assert np.allclose(model.coef, truth, rtol=1e-6)
    assert max(relative_errors(model, profiles)) < 1e-9
    with pytest.raises(ValueError, match="at least 2"):
        fit_step_model(profiles[:1])


def test_checkpoint_model_fit_and_real_write(tmp_path: Path) -> None:
    sizes = [1_000_000, 4_000_000, 16_000_000]
    model = fit_checkpoint_model(sizes, [0.01 + s / 200e6 for s in sizes])
    assert model.overhead_s == pytest.approx(0.01)
    assert model.mb_per_s == pytest.approx(200.0)
    assert model.predict(2_000_000) == pytest.approx(0.02)
    seconds = measure_checkpoint(400_000, tmp_path, repeats=2)
    assert seconds > 0
    assert (tmp_path / "checkpoint.safetensors").stat().st_size >= 400_000
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temp file left


def test_step_features_hand_computed() -> None:
    base = load_config("homogeneous")
    inst = load_catalog().get("gcp-n1-4-k80")
    spec = TransientSpec()
    cfg = cluster_config(base, inst, 4, spec)
    f = step_features(cfg)
    flops = prepare(cfg, 4).flops_per_sample
    assert f.compute_s == pytest.approx(flops * 32 / (inst.capacity_gflops * 1e-3 * 1e9))
    nbytes = model_bytes(cfg) + cfg.engine.header_bytes
    bw = spec.bandwidth_mbps * 1e6 / 8
    assert f.comm_s == pytest.approx(3 / 4 * 2 * (nbytes / bw + spec.latency_ms / 1e3))
    # 3 remote workers' pushes and pulls at the server's NIC take less than one worker's
    # own iteration here: the server is no bottleneck.
    assert 3 * 2 * nbytes / bw < f.compute_s
    assert f.server_excess_s == 0.0
    slow = cluster_config(base, inst, 8, spec.model_copy(update={"bandwidth_mbps": 1.0}))
    g = step_features(slow)
    serve = 7 * 2 * (nbytes / (1e6 / 8))
    assert g.server_excess_s == pytest.approx(serve - g.compute_s - 2 * nbytes / (1e6 / 8))
    one = step_features(cluster_config(base, inst, 1, spec))
    assert one.comm_s == 0.0 and one.server_excess_s == 0.0  # one worker talks to nobody
    assert cfg.train.lr == pytest.approx(base.train.lr * 4)  # linear scaling with the count


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400), ("3600s", 3600), ("45", 45)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "h", "-1h", "0", "nan", "2h junk", "inf"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--deadline"):
        parse_duration(text)


def test_parse_budget() -> None:
    assert parse_budget("$12.5") == 12.5
    for bad in ("-3", "0", "ten", "nan"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_budget(bad)


def test_finish_time_and_cost_by_hand() -> None:
    # 2 workers, 4 s of full-cluster work. Rank 0 revoked at 1, replacement ready at 3.
    leases = [Lease(0, 0, 0, 1.0), Lease(0, 1.0, 3.0, None), Lease(1, 0, 0, None)]
    # [0,1]: full rate -> 1 done; [1,3]: half rate -> 2 done; then full: 2 more s -> t = 5.
    assert finish_time(leases, 2, 4.0) == pytest.approx(5.0)
    assert finish_time(leases, 2, 0.5) == pytest.approx(0.5)
    # Billed: rank 0: [0,1] + [1,5]; rank 1: [0,5] -> 10 s at 3600 $/h = $10.
    assert billed_cost(leases, 5.0, 3600.0) == pytest.approx(10.0)
    # Everyone gone for good: never finishes.
    assert finish_time([Lease(0, 0, 0, 1.0)], 1, 5.0) == math.inf


def _outcome(label: str, times: list[float], costs: list[float]) -> Outcome:
    inst = load_catalog().get("aws-p2.xlarge")
    cand = Candidate(inst, len(label), "transient")
    return Outcome(cand, 1.0, times[0], np.array(times), np.array(costs), np.zeros(len(times)))


def test_recommend_deadline_budget_and_fallback() -> None:
    fast = _outcome("aaaa", [1.0, 1.0, 1.0, 1.0], [10.0] * 4)
    cheap = _outcome("a", [5.0, 5.0, 5.0, 9.0], [2.0] * 4)
    middle = _outcome("aa", [3.0, 3.0, 3.0, 3.0], [6.0] * 4)
    plan = recommend([fast, cheap, middle], "deadline", 4.0, 0.9)
    assert plan.recommended is middle and plan.meets_confidence  # cheapest that is sure
    plan = recommend([fast, cheap, middle], "deadline", 6.0, 0.75)
    assert plan.recommended is cheap  # 3 of 4 draws meet 6 s
    plan = recommend([fast, cheap, middle], "budget", 7.0, 0.9)
    assert plan.recommended is middle  # fastest within the budget
    plan = recommend([fast, cheap, middle], "deadline", 0.5, 0.9)
    assert plan.recommended is None and not plan.meets_confidence
    assert pareto_front([fast, cheap, middle]) == [fast, middle, cheap]
    dominated = _outcome("aaa", [4.0] * 4, [12.0] * 4)
    assert dominated not in pareto_front([fast, cheap, middle, dominated])


def test_evaluate_revocations_slow_and_cheapen() -> None:
    inst = InstanceType(
        name="flaky",
        peak_gflops=100,
        efficiency=1,
        on_demand_per_h=1.0,
        transient_per_h=0.3,
        startup_s=1800,
        revocation=Revocation(distribution="exponential", mean_lifetime_h=1.0),
    )
    work = Workload(iterations=lambda i, n: [1000.0, 1200.0], step_s=lambda i, n: 36.0)
    spec = TransientSpec()
    od = evaluate(Candidate(inst, 4, "on-demand"), work, spec, 300, 0)
    tr = evaluate(Candidate(inst, 4, "transient"), work, spec, 300, 0)
    # On-demand: no revocations; time is iterations x step, around the profiled 10-12 h,
    # and 4 instances at $1/h for that long.
    assert 9.0 < float(np.median(od.times_s)) / 3600 < 13.0
    assert np.allclose(od.costs, 4 * od.times_s / 3600)
    assert tr.mean_time_s > od.mean_time_s  # revocations and startups slow it down
    assert tr.mean_cost < od.mean_cost  # but at 30% of the price it is cheaper
    assert tr.revocations.mean() > 10
    never = Workload(iterations=lambda i, n: [None], step_s=lambda i, n: 36.0)
    out = evaluate(Candidate(inst, 4, "transient"), never, spec, 5, 0)
    assert math.isinf(out.mean_time_s) and out.p_time(1e9) == 0.0


def test_profile_of_one_cluster_reproduces_its_step() -> None:
    from dlion.core.config import with_changes
    from dlion.transient.profile import profile_workload, workload

    base = with_changes(
        load_config("homogeneous"), ["strategy.name=ps-asp", "train.target_acc=0.8"]
    )
    inst = load_catalog().get("aws-p2.xlarge")
    spec = TransientSpec()
    prof = profile_workload(base, [inst], [2], spec, seeds=1, progress=False)
    its = prof.iterations["aws-p2.xlarge"][2]
    assert its[0] is not None and its[0] > 0
    work = workload(prof, base, spec)
    assert work.step_s(inst, 2) == pytest.approx(prof.steps[0].step_s * spec.time_scale)


def test_iteration_draws_spread_beyond_few_profiled_seeds() -> None:
    from dlion.transient.planner import IterationDraws

    rng = __import__("random").Random(0)
    same = IterationDraws([300.0, 300.0, 300.0])
    assert {same.draw(rng) for _ in range(50)} == {300.0}
    few = IterationDraws([280.0, 300.0, 320.0])
    draws = np.array([few.draw(rng) for _ in range(20000)])
    assert abs(float(np.median(draws)) - 300.0) < 2.0
    # The empirical samples never exceed 320; the predictive puts real mass beyond them
    # (t with 2 degrees of freedom, scale 20 * sqrt(4/3)): P(> 320) = P(t2 > 0.866) ~ 0.24.
    assert 0.18 < float(np.mean(draws > 320.0)) < 0.30
    half = IterationDraws([300.0, None])
    assert 0.4 < float(np.mean([math.isinf(half.draw(rng)) for _ in range(2000)])) < 0.6
    with pytest.raises(ValueError, match="no iteration profile"):
        IterationDraws([])
