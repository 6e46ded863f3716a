"""`dlion train` on FL configs, `dlion bench` on FL suites, `dlion fl`, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dlion.cli.commands import main
from dlion.fl.config import is_fl_source, load_fl_config
from fl_helpers import tiny

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(tmp_path: Path, name: str = "fl.yaml", **changes: object) -> Path:
    raw = tiny().model_dump(mode="json")
    raw.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_train_runs_a_federated_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--out", str(out), "--quiet", "--strategy", "fedbuff"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "fedbuff" and summary["engine"] == "sim"
    for key in ("tta_s", "final_acc", "time_s", "bytes_sent", "server", "vanished"):
        assert key in summary
    assert (out / "partition.json").is_file() and (out / "metrics.jsonl").is_file()
    assert (out / "accuracy_vs_time.png").read_bytes()[:8] == PNG_MAGIC
    assert "fedbuff seed 0" in capsys.readouterr().out


def test_fl_config_detection_follows_extends(tmp_path: Path) -> None:
    base = _write(tmp_path, "base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nclients: {count: 6}\n")
    assert is_fl_source(str(child)) and is_fl_source(str(base))
    assert is_fl_source("fl-digits") and not is_fl_source("homogeneous")
    assert load_fl_config(str(child)).clients.count == 6
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text("extends: fl-mnist1d\nname: mine\n")
    assert is_fl_source(str(shipped))
    assert load_fl_config(str(shipped)).data.name == "mnist1d"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "clients.count=0"], "clients.count"),
        (["--set", "clients.concurrency=99"], "clients.concurrency: 99 exceeds"),
        (["--set", "algorithm.name=fedsgd"], "unknown FL algorithm 'fedsgd'"),
        (["--set", "algorithm.options.k=0"], "algorithm.options"),
        (["--set", "clients.compute_gflops.min=-1"], "clients.compute_gflops.min"),
        (
            ["--set", "clients.bandwidth_mbps.max=0.5", "--set", "clients.bandwidth_mbps.min=2"],
            "max (0.5) must be >= min",
        ),
        (["--set", "security.norm_action=ignore"], "security.norm_action"),
        (["--set", "bogus=1"], "bogus"),
        (["--engine", "mpi"], "--engine"),
        (["--engine", "dist", "--set", "clients.count=17"], "at most 16"),
        (["--engine", "dist", "--resume", "/nonexistent/run"], "no such run directory"),
        (["--resume", "/nonexistent/run"], "no such run directory"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    cfg = _write(tmp_path)
    assert main(["train", str(cfg), "--quiet", "--out", str(tmp_path / "o"), *args]) == 2
    assert fragment in _one_error_line(capsys)


def test_bad_yaml_and_kind_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: fl\nclients: [1, 2\n")
    assert main(["train", str(bad), "--quiet"]) == 2
    _one_error_line(capsys)
    many = tmp_path / "shards.yaml"
    raw = tiny().model_dump(mode="json")
    raw["data"].update(partition="shards", shards_per_client=10_000)
    many.write_text(yaml.safe_dump(raw))
    assert main(["train", str(many), "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "data.shards_per_client" in _one_error_line(capsys)


def test_bench_runs_an_fl_suite_and_reuses_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write(tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "kind": "fl",
                "name": "mini",
                "scenarios": [str(cfg)],
                "variants": {"a0.5": ["data.alpha=0.5"], "a1": ["data.alpha=1.0"]},
                "algorithms": [
                    {"label": "fedasync", "algorithm": "fedasync"},
                    {"label": "fedpace", "algorithm": "fedpace"},
                ],
                "seeds": 1,
                "set": ["train.max_time=3"],
            }
        )
    )
    out = tmp_path / "bench"
    assert main(["bench", str(suite), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 2 * 2
    assert {r["strategy"] for r in summary["runs"]} == {"fedasync", "fedpace"}
    report = (out / "report.md").read_text()
    assert "| fedasync |" in report and "fedpace vs each baseline" in report
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    # A second bench finds every run finished and reruns nothing.
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json") if "runs" in p.parts}
    assert main(["bench", str(suite), "--out", str(out), "--quiet"]) == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in stamp}
    capsys.readouterr()
    assert main(["bench", str(suite), "--out", str(out), "--quiet", "--strategies", "nope"]) == 2
    assert "--strategies" in _one_error_line(capsys)


def test_fl_listings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fl", "algorithms"]) == 0
    out = capsys.readouterr().out
    for name in (
        "fedavg",
        "fedasync",
        "fedbuff",
        "fedasmu",
        "fedasmu-noserver",
        "fedasmu-nodevice",
        "ca2fl",
        "fedcompass",
        "fadas",
        "fedpace",
        "fedpace-nopull",
    ):
        assert name in out
    assert main(["fl", "scenarios"]) == 0
    assert "fl-digits" in capsys.readouterr().out


def test_shipped_fl_suite_loads() -> None:
    from dlion.fl.bench import is_fl_suite, load_fl_suite

    assert is_fl_suite("fl") and not is_fl_suite("quick")
    suite = load_fl_suite("fl")
    assert suite.seeds == 3 and len(suite.algorithms) == 13
    assert suite.scenarios == ["fl-digits", "fl-mnist1d"]
    # The same search for every method, on pilot seeds that are not bench seeds.
    assert suite.search is not None and not set(suite.search.seeds) & set(range(suite.seeds))
    searched = [a for a in suite.algorithms if a.grid]
    assert {len(a.grid_points()) for a in searched} == {suite.search.points}
    assert all(a.grid or a.tuned_as == "fedpace" for a in suite.algorithms)


def test_bench_searches_every_grid_on_pilot_seeds_and_uses_the_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _write(tmp_path)
    raw: dict[str, object] = {
        "kind": "fl",
        "name": "mini",
        "scenarios": [str(cfg)],
        "search": {"seeds": [7], "settings": [str(cfg)], "points": 2},
        "algorithms": [
            {"label": "fedbuff", "algorithm": "fedbuff", "grid": {"server_lr": [0.01, 1.0]}},
            {"label": "pace", "algorithm": "fedpace", "grid": {"k": [1, 2]}},
            {"label": "pace-nopull", "algorithm": "fedpace-nopull", "tuned_as": "pace"},
        ],
        "seeds": 1,
        "set": ["train.max_time=3"],
    }
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(raw))
    out = tmp_path / "bench"
    assert main(["bench", str(suite), "--out", str(out), "--quiet"]) == 0
    search = json.loads((out / "search.json").read_text())
    assert search["seeds"] == [7]
    for label in ("fedbuff", "pace"):
        points = search["algorithms"][label]["points"]
        assert len(points) == 2
        best = max(points, key=lambda p: p["acc"])
        assert search["algorithms"][label]["chosen"] == best["options"]
    # pilot runs use seed 7 only; the bench runs use the chosen options
    pilots = [json.loads(p.read_text()) for p in (out / "search").rglob("summary.json")]
    assert len(pilots) == 4 and {p["seed"] for p in pilots} == {7}
    chosen_k = search["algorithms"]["pace"]["chosen"]["k"]
    for label in ("pace", "pace-nopull"):
        run_cfg = yaml.safe_load(
            (
                out / "runs" / next((out / "runs").iterdir()).name / label / "seed0" / "config.yaml"
            ).read_text()
        )
        assert run_cfg["algorithm"]["options"]["k"] == chosen_k
    assert "chosen hyperparameters" in (out / "report.md").read_text()
    capsys.readouterr()
    # A changed config is run again, never reused: the pilots' summaries are rewritten.
    stamp = {p: p.stat().st_mtime_ns for p in (out / "search").rglob("summary.json")}
    suite.write_text(yaml.safe_dump({**raw, "set": ["train.max_time=2"]}))
    assert main(["bench", str(suite), "--out", str(out), "--quiet"]) == 0
    assert all(p.stat().st_mtime_ns != t for p, t in stamp.items())
    capsys.readouterr()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"search": {"seeds": [0], "settings": ["x"], "points": 2}}, "are bench seeds"),
        ({"search": {"seeds": [9], "settings": ["x"], "points": 3}}, "every algorithm gets"),
        ({"search": {"seeds": [9], "settings": ["nope"], "points": 2}}, "not in the suite"),
        ({"search": None}, "needs a search section"),
    ],
)
def test_unfair_or_bad_searches_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, object], message: str
) -> None:
    cfg = str(_write(tmp_path))
    raw: dict[str, object] = {
        "kind": "fl",
        "name": "mini",
        "scenarios": [cfg],
        "algorithms": [{"label": "b", "algorithm": "fedbuff", "grid": {"k": [1, 2]}}],
        "seeds": 1,
    }
    raw.update(change)
    if isinstance(raw.get("search"), dict) and raw["search"]["settings"] == ["x"]:  # type: ignore[index]
        raw["search"]["settings"] = [cfg]  # type: ignore[index]
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(raw))
    assert main(["bench", str(suite), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert message in _one_error_line(capsys)
