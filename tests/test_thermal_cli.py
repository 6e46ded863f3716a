"""`dlion thermal simulate | bench | profiles` in-process: outputs and one-line bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlion.cli.commands import main
from dlion.thermal.bench import BenchSpec, run_bench

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sparta's default start table lives in the user cache; keep tests out of it.
    monkeypatch.setenv("DLION_CACHE_DIR", str(tmp_path / "cache"))


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


def test_profiles_lists_shipped(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["thermal", "profiles"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["jetson-nano", "nuc", "rpi4"]


def test_simulate_reports_and_writes_summary_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    rc = main(
        ["thermal", "simulate", "rpi4", "--policy", "reactive", "--set", "ambient_c=35",
         "--set", "workload=memory", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "completion" in text and "above 70" in text and "peak" in text and "energy" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["policy"] == "reactive" and s["workload"] == "memory" and s["ambient_c"] == 35
    assert s["finished"] and s["completion_s"] == s["time_s"] > 0
    assert 0.0 <= s["share_below"] <= 1.0
    assert s["energy_j"] > 0 and s["peak_c"] > 35
    assert (out / "temperature_frequency.png").read_bytes()[:8] == PNG


def test_simulate_yaml_config_with_custom_workload_and_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rpi4 = Path(__file__).resolve().parents[1] / "src/dlion/thermal_profiles/rpi4.yaml"
    (tmp_path / "dev.yaml").write_text(rpi4.read_text().replace("name: rpi4", "name: mypi"))
    (tmp_path / "cfg.yaml").write_text(
        "name: cam\ndevice: dev.yaml\nambient_c: 30\nthreshold_c: 65\n"
        "workload:\n  name: camera\n  repeat: 3\n  phases:\n"
        "    - {gcycles: 60, activity: 0.9}\n    - {kind: idle, idle_s: 5, activity: 0.05}\n"
        "sim: {seed: 4}\npolicy: {name: sparta, sparta: {margin_c: 1.0}}\n"
    )
    out = tmp_path / "o"
    table = tmp_path / "t.json"
    assert main(["thermal", "simulate", str(tmp_path / "cfg.yaml"), "--out", str(out),
                 "--table", str(table)]) == 0  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert (s["device"], s["workload"], s["threshold_c"], s["seed"]) == ("mypi", "camera", 65, 4)
    assert json.loads(table.read_text())["entries"][0]["app"] == "camera"


def test_default_table_goes_to_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["thermal", "simulate", "rpi4", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "cache/thermal/sparta_table.json").is_file()


BAD = [
    (["thermal", "simulate", "{tmp}/missing.yaml"], "{tmp}/missing.yaml"),
    (["thermal", "simulate", "no-such-device"], "no-such-device"),
    (["thermal", "simulate", "{tmp}/bad.yaml"], "line"),
    (["thermal", "simulate", "{tmp}/unknown-key.yaml"], "fan_speed"),
    (["thermal", "simulate", "{tmp}/bad-device.yaml"], "dev-bad.yaml: cores: Field required"),
    (["thermal", "simulate", "rpi4", "--policy", "ondemand"], "--policy: unknown policy"),
    (["thermal", "simulate", "rpi4", "--set", "threshold_c=20"], "threshold_c must be above"),
    (["thermal", "simulate", "rpi4", "--set", "workload=video"], "unknown workload 'video'"),
    (["thermal", "simulate", "rpi4", "--set", "sim.dt_s=-1"], "sim.dt_s"),
    (["thermal", "simulate", "rpi4", "--set", "policy.sparta.margin=1"], "policy.sparta.margin"),
    (["thermal", "simulate", "rpi4", "--set", "policy.reactive.hysteresis_c=x"], "hysteresis_c"),
    (["thermal", "simulate", "rpi4", "--set", "sim.seed"], "KEY=VALUE"),
    (["thermal", "simulate", "rpi4", "--table", "{tmp}/bad-table.json"], "bad-table.json"),
    (["thermal", "bench", "--out", "{tmp}/b", "--policies", "reactive,warp"], "warp"),
    (["thermal", "bench", "--out", "{tmp}/b", "--policies", "reactive"], "needs sparta"),
    (["thermal", "bench", "--out", "{tmp}/b", "--ambients", "hot"], "--ambients"),
    (["thermal", "bench", "--out", "{tmp}/b", "--workloads", "video"], "--workloads"),
    (["thermal", "bench", "--out", "{tmp}/b", "--device", "toaster"], "toaster"),
    (["thermal", "bench", "--out", "{tmp}/b", "--seeds", "0"], "--seeds"),
    (["thermal", "bench", "--out", "{tmp}/b", "--set", "sim.bogus=1"], "sim.bogus"),
    (["thermal", "nope"], "nope"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD, ids=[" ".join(a[1:4]) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    (tmp_path / "bad.yaml").write_text("ambient_c: [30\n")
    (tmp_path / "unknown-key.yaml").write_text("ambient_c: 30\nfan_speed: 2\n")
    (tmp_path / "dev-bad.yaml").write_text("name: x\n")
    (tmp_path / "bad-device.yaml").write_text("device: dev-bad.yaml\n")
    (tmp_path / "bad-table.json").write_text("[1, 2")
    tmp = str(tmp_path)
    rc = main([a.replace("{tmp}", tmp) for a in argv])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert fragment.replace("{tmp}", tmp) in line
    assert not (tmp_path / "b" / "summary.json").exists()


def test_small_bench_writes_table_json_report_and_pngs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b"
    rc = main(
        ["thermal", "bench", "--out", str(out), "--ambients", "35", "--workloads", "compute",
         "--policies", "reactive,sparta", "--seeds", "2", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "reactive" in text and "sparta" in text and "compute @ 35" in text
    data = json.loads((out / "summary.json").read_text())
    assert len(data["runs"]) == 4
    assert {r["policy"] for r in data["rows"]} == {"reactive", "sparta"}
    assert data["verdicts"][0]["sparta_meets_goal"] in (True, False)
    report = (out / "report.md").read_text()
    assert "| 35 | compute | sparta |" in report
    assert (out / "thermal_rpi4_compute_35C.png").read_bytes()[:8] == PNG
    table = json.loads((out / "sparta_table.json").read_text())
    assert [e["app"] for e in table["entries"]] == ["compute"]


def test_bench_is_deterministic(tmp_path: Path) -> None:
    spec = BenchSpec(ambients=(30.0,), workloads=("bursty",), policies=("sparta",), seeds=2)
    a = run_bench(spec, tmp_path / "a", progress=False)[0]
    b = run_bench(spec, tmp_path / "b", progress=False)[0]
    assert a == b


@pytest.mark.slow
def test_full_bench_sparta_stays_under_threshold_everywhere(tmp_path: Path) -> None:
    """The headline claim on the default grid: Sparta >= 94% below in every feasible run."""
    _, rows, _ = run_bench(BenchSpec(), tmp_path, progress=False)
    sparta = [r for r in rows if r.policy == "sparta"]
    assert len(sparta) == 9
    assert all(r.share_below_min >= 0.94 for r in sparta)
    perf = [r for r in rows if r.policy == "performance" and r.workload == "compute"]
    assert all(r.vs_sparta < 1 and r.share_below_mean < 0.5 for r in perf)


def test_bench_takes_a_profile_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rpi4 = Path(__file__).resolve().parents[1] / "src/dlion/thermal_profiles/rpi4.yaml"
    device = tmp_path / "hotpi.yaml"
    device.write_text(rpi4.read_text().replace("name: rpi4", "name: hotpi"))
    out = tmp_path / "b"
    argv = ["thermal", "bench", "--out", str(out), "--device", str(device), "--ambients", "30",
            "--workloads", "memory", "--policies", "sparta", "--seeds", "1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["runs"][0]["device"] == "hotpi"
    assert (out / "thermal_hotpi_memory_30C.png").is_file()
