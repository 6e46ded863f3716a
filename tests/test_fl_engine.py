"""The FL sim engine end to end: every algorithm trains, runs are deterministic, idle clients
hold no model, the partition is saved, clients vanish (even mid-upload) without harm."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dlion.fl import ALGORITHMS
from dlion.fl.config import FLConfig
from dlion.fl.population import ClientProfile, make_population, split_clients
from dlion.jobs.fl_sim import run_fl
from fl_helpers import tiny


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_the_global_model(name: str) -> None:
    result = run_fl(tiny(algorithm={"name": name}, train={"max_time": 4}), progress=False)
    s = result.summary
    assert s["iterations"] > 0  # the global version moved
    assert s["final_acc"] > 0.3  # chance is 0.1
    assert s["peak_models_held"] <= 3  # idle clients hold no model
    assert s["server"]["rejected_total"] == 0


def test_runs_are_deterministic_for_a_seed() -> None:
    short = {"max_time": 4}
    a = run_fl(tiny(train=short), progress=False)
    b = run_fl(tiny(train=short), progress=False)
    assert [p.mean_acc for p in a.points] == [p.mean_acc for p in b.points]
    assert torch.equal(a.model, b.model)
    c = run_fl(tiny(train={**short, "seed": 1}), progress=False)
    assert not torch.equal(a.model, c.model)


def test_outputs_and_saved_partition(tmp_path: Path) -> None:
    cfg = tiny(data={"partition": "shards", "shards_per_client": 3, "size_sigma": 1.0})
    run_fl(cfg, out_dir=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == "fedasmu" and summary["clients"] == 8
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert [e["t"] for e in events if e["event"] == "eval"] == [0, 2, 4, 6, 8]
    part = json.loads((tmp_path / "partition.json").read_text())
    indices = [i for c in part["clients"] for i in c["indices"]]
    assert sorted(indices) == list(range(len(indices)))  # disjoint and complete
    sizes = [c["size"] for c in part["clients"]]
    assert len(set(sizes)) > 1  # per-client sample counts vary
    assert part["scheme"] == "shards"


def test_dirichlet_split_is_label_skewed() -> None:
    cfg = tiny(data={"alpha": 0.1}, clients={"count": 20, "concurrency": 2})
    labels = np.arange(1000) % 10
    parts = split_clients(labels, cfg)
    classes_per_client = [len(np.unique(labels[p])) for p in parts]
    assert np.mean(classes_per_client) < 6  # IID would give all 10 classes to each
    assert sum(len(p) for p in parts) == 1000


def test_availability_is_seeded_and_alternates() -> None:
    cfg = tiny(clients={"count": 4, "availability": {"mean_online_s": 5, "mean_offline_s": 5}})
    a, b = make_population(cfg), make_population(cfg)
    spans_a = [a[0].online_span(t) for t in range(0, 100, 7)]
    assert spans_a == [b[0].online_span(t) for t in range(0, 100, 7)]
    starts = [s for s, _ in spans_a]
    assert starts == sorted(starts) and len(set(starts)) > 3
    always = make_population(tiny(clients={"availability": {"mean_offline_s": 0}}))
    assert always[0].online_span(1e6) == (0.0, math.inf)


class _Scripted(ClientProfile):
    """A client online in [0, off) and never again."""

    off: float = 0.0

    def online_span(self, t: float) -> tuple[float, float]:
        return (0.0, self.off) if t < self.off else (math.inf, math.inf)


def test_client_vanishing_mid_upload_leaves_the_model_unchanged(monkeypatch: Any) -> None:
    # One client on a 0.1 Mbit/s link (12.5 kB/s): the ~9.8 kB model downloads in ~0.78 s,
    # its 45 local steps (half an epoch) take ~1 ms at 10 GFLOP/s, and the upload another
    # ~0.78 s. It goes offline at 1.2 s, in the middle of the upload.
    cfg = tiny(
        clients={
            "count": 1,
            "concurrency": 1,
            "compute_gflops": {"min": 10, "max": 10},
            "bandwidth_mbps": {"min": 0.1, "max": 0.1},
            "latency_ms": 0,
        },
        data={"partition": "iid"},
        train={"max_time": 4},
        evaluation={"every_s": 1},
        algorithm={"name": "fedasync"},
    )

    def population(c: FLConfig) -> list[ClientProfile]:
        p = _Scripted(client=0, gflops=10.0, bandwidth_mbps=0.1, _rng=None)  # type: ignore[arg-type]
        p.off = 1.2
        return [p]

    monkeypatch.setattr("dlion.fl.job.make_population", population)
    result = run_fl(cfg, progress=False)
    s = result.summary
    assert s["server"]["merged"] == 0 and s["server"]["uploads"] == 0
    assert s["server"]["abandoned"] == 1 and s["vanished"] == 1
    assert s["local_steps"] == 45  # training finished: it vanished during the upload
    initial = run_fl(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_time": 0.001})}),
        progress=False,
    ).model
    assert torch.equal(result.model, initial)  # bit for bit the initial model
    # The same client staying online uploads and the model moves.
    monkeypatch.setattr("dlion.fl.job.make_population", make_population)
    assert (
        run_fl(
            cfg.model_copy(
                update={
                    "clients": cfg.clients.model_copy(
                        update={
                            "availability": cfg.clients.availability.model_copy(
                                update={"mean_offline_s": 0}
                            )
                        }
                    )
                }
            ),
            progress=False,
        ).summary["server"]["merged"]
        > 0
    )


@pytest.mark.slow
def test_two_hundred_clients_hold_at_most_concurrency_models() -> None:
    cfg = tiny(
        clients={"count": 200, "concurrency": 20}, train={"max_time": 4}, data={"name": "digits"}
    )
    s = run_fl(cfg, progress=False).summary
    assert 0 < s["peak_models_held"] <= 20
    assert s["server"]["merged"] > 20
