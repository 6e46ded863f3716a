"""Strict inputs, by class: duplicate YAML keys, `extends` cycles on every path,
non-finite and out-of-range numbers, labels outside the class range, arguments checked
before work, exact bench reuse, diverged runs in strict JSON. Each is one line, exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dlion.cli.commands import main
from dlion.core.config import load_config
from dlion.core.errors import ConfigError, DataError
from dlion.core.strict_yaml import strict_load
from dlion.data.readers import read_npz
from dlion.fl.config import is_fl_source


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------- strict YAML


def test_duplicate_key_names_the_key_and_both_lines(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("extends: homogeneous\ntrain:\n  lr: 0.1\n  seed: 1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 5 duplicate key 'lr' \(first given on line 3\)"):
        load_config(str(cfg))


def test_duplicate_section_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("extends: homogeneous\ntrain: {lr: 0.1}\nmodel: {}\ntrain: {seed: 2}\n")
    with pytest.raises(ConfigError, match="line 4 duplicate key 'train'"):
        load_config(str(cfg))


def test_duplicate_key_in_a_set_value_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--set strategy\.options: duplicate key 'k'"):
        load_config("homogeneous", ["strategy.options={k: 1, k: 2}"])


def test_merge_keys_still_override() -> None:
    assert strict_load("a: &a {x: 1, y: 2}\nb: {<<: *a, x: 3}") == {
        "a": {"x": 1, "y": 2},
        "b": {"x": 3, "y": 2},
    }


# Prefixed: YAML 1.1 reads bare words such as `on`, `no`, `y` as booleans, not keys.
_keys = st.from_regex(r"k_[a-z_]{0,6}", fullmatch=True)
_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(alphabet="abcxyz ", max_size=8),
)
_docs = st.recursive(
    st.dictionaries(_keys, _scalars, max_size=4),
    lambda inner: st.dictionaries(
        _keys, st.one_of(_scalars, inner, st.lists(_scalars)), max_size=4
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(_docs)
def test_property_loader_reads_what_safe_dump_wrote(doc: dict) -> None:
    """Any document without duplicates or non-finite numbers reads back as written."""
    assert strict_load(yaml.safe_dump(doc)) == doc


@settings(max_examples=150, deadline=None)
@given(_docs.filter(bool), st.data())
def test_property_any_repeated_key_is_refused_with_its_line(doc: dict, data: st.DataObject) -> None:
    text = yaml.safe_dump(doc, sort_keys=False)
    key = data.draw(st.sampled_from(sorted(doc)))
    doubled = text + yaml.safe_dump({key: 1})
    with pytest.raises(yaml.YAMLError) as info:
        strict_load(doubled)
    assert f"duplicate key {key!r}" in str(info.value)
    assert info.value.problem_mark.line == len(text.splitlines())  # the repeat's line


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([".inf", "-.inf", ".nan", ".NaN", "inf", "-Infinity", "nan"]), _keys)
def test_property_non_finite_numbers_are_refused(word: str, key: str) -> None:
    with pytest.raises(yaml.YAMLError, match="not a finite number"):
        strict_load(f"{key}: {word}\n")
    assert strict_load(f'{key}: "{word}"\n') == {key: word}  # quoted text stays text


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1))
def test_property_integers_beyond_64_bits_are_refused(n: int) -> None:
    with pytest.raises(yaml.YAMLError, match="64-bit"):
        strict_load(f"seed: {n}\n")


# ----------------------------------------------------------------------------- extends cycles


def test_extends_itself_on_the_train_path_does_not_hang(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("self.yaml").write_text("extends: self.yaml\n")
    assert not is_fl_source("self.yaml")
    assert main(["train", "self.yaml", "--quiet"]) == 2
    assert "extends itself" in _error(capsys)


def test_extends_cycle_through_another_spelling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("extends: sub/b.yaml\n")
    (tmp_path / "sub" / "b.yaml").write_text("extends: ../a.yaml\n")
    assert not is_fl_source(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "a.yaml"))
    assert main(["train", str(tmp_path / "a.yaml"), "--quiet"]) == 2
    assert "extends itself" in _error(capsys)


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["train.lr=.inf"], "not a finite number"),
        (["train.lr=inf"], "not a finite number"),
        (["train.lr=nan"], "not a finite number"),
        (["cluster.workers.0.capacity_gflops=.inf"], "not a finite number"),
        (["train.seed=1180591620717411303424"], "64-bit"),
        (["train.seed=-1"], "train.seed"),
        (["train.seed=9223372036854775807", "train.max_time=.nan"], "not a finite number"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], fragment: str
) -> None:
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", "homogeneous", "--quiet", "--out", str(tmp_path / "o"), *args]) == 2
    assert fragment in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_non_finite_in_a_config_file_names_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "cluster:\n  sites: [{name: a}]\n  workers:\n    - {site: a, capacity_gflops: .inf}\n"
    )
    with pytest.raises(ConfigError, match=r"line 4 \.inf: not a finite number"):
        load_config(str(cfg))


def test_label_far_outside_the_class_range_is_refused_before_allocation(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((30, 4), np.float32), y=np.array([0] * 29 + [10**9]))
    with pytest.raises(DataError, match="label 1000000000; class ids must be below"):
        read_npz(path)


def test_diverged_run_is_strict_json_marked_and_warned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    args = ["train", "homogeneous", "--quiet", "--out", str(out)]
    args += ["--set", "train.lr=1e12", "--set", "train.max_time=1", "--set", "train.momentum=0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: 1 run(s) diverged" in err

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}"))

    summary = strict((out / "summary.json").read_text())
    assert isinstance(summary, dict) and summary["diverged"] is True
    assert summary["final_loss"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict(line)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--rank", "99"], "--rank: no worker 99"),
        (["--at", "1.5"], "--at: a fraction"),
        (["--at", "0"], "--at: a fraction"),
        (["--time-scale", "nan"], "--time-scale"),
    ],
)
def test_dist_fault_arguments_are_checked_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    assert main(["dist", "fault", *args, "--out", str(tmp_path / "o")]) == 2
    assert fragment in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_dist_parity_seeds_must_be_integers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dist", "parity", "--seeds", "0,x", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds" in _error(capsys)


@pytest.mark.parametrize("flag", ["--stop-at", "--checkpoint-every"])
@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_train_time_flags_must_be_finite_and_positive(
    capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    assert main(["train", "homogeneous", "--quiet", flag, value]) == 2
    assert flag in _error(capsys)


# ----------------------------------------------------------------------------- bench


def _suite(tmp_path: Path, strategies: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(
        "name: t\nscenarios: [homogeneous]\nideal: false\n"
        f"strategies: {strategies}\n"
        "set: [train.max_time=0.5, evaluation.every_s=0.25]\n"
    )
    return path


def test_bench_refuses_duplicate_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = _suite(tmp_path, "[{label: a, strategy: allreduce}, {label: a, strategy: dlion}]")
    assert main(["bench", str(suite), "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "label 'a' is used twice" in _error(capsys)


def test_bench_reuses_only_an_exactly_matching_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = str(_suite(tmp_path, "[{label: ar, strategy: allreduce}]"))
    out = tmp_path / "o"
    base = ["bench", suite, "--quiet", "--out", str(out)]
    assert main(base) == 0
    run = out / "runs" / "homogeneous" / "ar" / "seed0" / "metrics.jsonl"
    first = run.read_bytes()
    assert main(base) == 0  # same config: reused, not rerun
    assert run.read_bytes() == first
    capsys.readouterr()
    assert main([*base, "--set", "train.lr=0.2"]) == 2  # changed: not reported as new
    assert "differs at train.lr" in _error(capsys)
    assert run.read_bytes() == first
    assert main([*base, "--set", "train.lr=0.2", "--force"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    saved = yaml.safe_load((run.parent / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.2 and len(summary["runs"]) == 1
    assert math.isfinite(summary["runs"][0]["final_acc"])
