"""FL dist mode end to end: a server process and one process per client on this host.

One real job (3 clients, digits, fedasync): a client is SIGKILLed mid-run; the server
notices through the broken link, abandons its task, and the other two carry the global
model to the target. Costs ~20-30 s, mostly four Python processes importing torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dlion.comm.job import Fault
from dlion.errors import BadInput
from dlion.fl.config import FLConfig
from dlion.fl.dist import MAX_DIST_CLIENTS, run_fl_dist
from fl_helpers import tiny


def _cfg(clients: int = 3) -> FLConfig:
    return tiny(
        clients={
            "count": clients,
            "concurrency": min(clients, 3),
            "availability": {"mean_online_s": 10, "mean_offline_s": 0},
        },
        algorithm={"name": "fedasync"},
        train={"max_time": 30, "target_acc": 0.8, "stop_at_target": True},
        evaluation={"every_s": 0.25},
    )


def test_a_killed_client_is_abandoned_and_the_others_reach_the_target(tmp_path: Path) -> None:
    cfg = _cfg()
    result = run_fl_dist(cfg, out_dir=tmp_path, faults=[Fault(2, at=0.5)])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == result.summary
    assert s["engine"] == "dist" and s["clients"] == 3
    assert s["signals"] == [{"rank": 2, "t": pytest.approx(0.5, abs=0.5), "signal": "KILL"}]
    # The server saw the kill through the broken link, long before the heartbeat timeout.
    [gone] = s["departures"]
    assert gone["rank"] == 2 and gone["t"] - 0.5 < cfg.engine.peer_timeout
    assert s["server"]["abandoned"] >= 1
    # The run went on with the other two, to the target, after the kill.
    assert s["tta_s"] is not None and s["tta_s"] > gone["t"]
    assert s["final_acc"] >= 0.8 and math.isfinite(s["final_loss"])
    assert s["server"]["merged"] > 0 and s["server"]["rejected_total"] == 0
    assert result.model.isfinite().all() and result.model.numel() > 0
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and "client_left" in kinds
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["t"] for e in evals] == sorted(e["t"] for e in evals)
    assert evals[-1]["iteration"] == s["iterations"] > 0
    assert (tmp_path / "partition.json").exists() and (tmp_path / "global_model.pt").exists()


def test_too_many_clients_for_processes_is_refused_before_launching(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=f"at most {MAX_DIST_CLIENTS}"):
        run_fl_dist(_cfg(MAX_DIST_CLIENTS + 1), out_dir=tmp_path)
    with pytest.raises(BadInput, match="client rank"):
        run_fl_dist(_cfg(), out_dir=tmp_path, faults=[Fault(0, at=1.0)])
    assert not (tmp_path / "summary.json").exists()
