"""The output-directory policy (outdir.py): nothing the user did not ask to replace is
deleted or overwritten; an interrupted output says it is partial or leaves the older one
whole; unusable paths are one line before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlion.cli.commands import main
from dlion.core.errors import BadInput
from dlion.core.files import write_atomic
from dlion.core.outdir import (
    MARKER,
    default_dir,
    open_output,
    read_marker,
    safe_name,
)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _write_run(path: Path, text: str) -> None:
    """A complete dlion output holding summary.json = {"v": text}."""
    with open_output(path, command="train", force=True).writing() as work:
        (work / "summary.json").write_text(json.dumps({"v": text}))
        (work / "checkpoints").mkdir()
        (work / "checkpoints" / "step1.safetensors").write_text(text)


# ----------------------------------------------------------------------------- the policy


def test_new_directory_is_written_in_place_and_marked_complete(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    _write_run(out, "one")
    assert json.loads((out / "summary.json").read_text()) == {"v": "one"}
    marker = read_marker(out)
    assert marker is not None and marker["status"] == "complete"
    assert marker["entries"] == ["checkpoints", "summary.json"]


def test_finished_output_is_refused_without_force(tmp_path: Path) -> None:
    _write_run(tmp_path / "r", "one")
    before = _tree(tmp_path / "r")
    with pytest.raises(BadInput, match="holds a finished `train` output; pass --force"):
        open_output(tmp_path / "r", command="train")
    assert _tree(tmp_path / "r") == before


def test_force_replaces_an_earlier_output_whole(tmp_path: Path) -> None:
    _write_run(tmp_path / "r", "one")
    with open_output(tmp_path / "r", command="train", force=True).writing() as work:
        assert work != tmp_path / "r"  # staged beside it
        (work / "summary.json").write_text(json.dumps({"v": "two"}))
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"v": "two"}
    assert not (tmp_path / "r" / "checkpoints").exists()  # the old run's, replaced with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temp dirs left


@pytest.mark.parametrize("force", [False, True])
def test_user_files_are_never_replaced_even_with_force(tmp_path: Path, force: bool) -> None:
    (tmp_path / "config.yaml").write_text("cluster: {}\n")  # --out . next to the config
    with pytest.raises(BadInput, match=r"holds files dlion did not write \(config.yaml\)"):
        open_output(tmp_path, command="train", force=force)
    _write_run(tmp_path / "r", "one")
    (tmp_path / "r" / "notes.txt").write_text("mine")  # added to a finished run later
    with pytest.raises(BadInput, match=r"notes.txt"):
        open_output(tmp_path / "r", command="train", force=force)
    assert (tmp_path / "config.yaml").read_text() == "cluster: {}\n"


def test_interrupted_new_output_says_partial(tmp_path: Path) -> None:
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt), open_output(out, command="train").writing() as work:
        (work / "metrics.jsonl").write_text('{"event": "start"}\n')
        raise KeyboardInterrupt
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "partial"
    marker = read_marker(out)
    assert marker is not None and marker["status"] == "partial"


def test_interrupted_replacement_leaves_the_older_output_whole(tmp_path: Path) -> None:
    _write_run(tmp_path / "r", "one")
    before = _tree(tmp_path / "r")
    output = open_output(tmp_path / "r", command="train", force=True)
    with pytest.raises(KeyboardInterrupt), output.writing() as work:
        (work / "summary.json").write_text(json.dumps({"v": "half"}))
        raise KeyboardInterrupt
    assert _tree(tmp_path / "r") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_bad_input_on_the_way_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(BadInput), open_output(tmp_path / "new", command="train").writing():
        raise BadInput("data file missing")
    assert not (tmp_path / "new").exists()


def test_out_naming_a_file_or_a_path_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInput, match="f: is a file, not a directory"):
        open_output(tmp_path / "f", command="train")
    with pytest.raises(BadInput, match="f is a file, not a directory"):
        open_output(tmp_path / "f" / "sub" / "run", command="train")
    assert (tmp_path / "f").read_text() == "x"


def test_no_write_permission_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root may write anywhere, so the permission answer is simulated where the test runs as root.
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked)
    with pytest.raises(BadInput, match="no permission to write in"):
        open_output(locked / "run", command="train")


def test_default_directories_stay_inside_runs() -> None:
    for name in ["../../x", "/etc/passwd", "a/b", "..", ".hidden", ""]:
        path = default_dir(name, "dlion", "seed0")
        assert path.parent == Path("runs")
        assert ".." not in path.parts and "/" not in path.name


# ----------------------------------------------------------------------------- properties

_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=0, max_size=30
)


@given(_names)
def test_property_safe_name_is_one_portable_child(name: str) -> None:
    safe = safe_name(name)
    assert safe and not safe.startswith(".")
    assert Path(safe).name == safe and Path("runs", safe).parent == Path("runs")


_files = st.dictionaries(
    st.from_regex(r"[a-z]{1,8}(\.json|\.yaml|\.txt)?", fullmatch=True),
    st.binary(max_size=20),
    max_size=4,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(user=_files, force=st.booleans(), interrupt=st.booleans(), earlier=st.booleans())
def test_property_user_files_and_finished_runs_survive(
    tmp_path_factory: pytest.TempPathFactory,
    user: dict[str, bytes],
    force: bool,
    interrupt: bool,
    earlier: bool,
) -> None:
    """Whatever the directory holds, whatever the flags, and whether or not the run is
    interrupted: user files are byte-identical afterwards, and a finished run is either
    intact or (only with --force and a completed new run) wholly replaced."""
    root = tmp_path_factory.mktemp("out")
    out = root / "r"
    if earlier:
        _write_run(out, "old")
    out.mkdir(exist_ok=True)
    for name, data in user.items():
        if name != MARKER:
            (out / name).write_bytes(data)
    before = _tree(out)
    try:
        output = open_output(out, command="train", force=force)
    except BadInput:
        assert _tree(out) == before  # refused: nothing changed
        assert user or (earlier and not force)
        return
    assert not user  # a directory with user files is never accepted
    try:
        with output.writing() as work:
            (work / "summary.json").write_text('{"v": "new"}')
            if interrupt:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    summary = json.loads((out / "summary.json").read_text())
    if earlier and interrupt:
        assert _tree(out) == before  # the older run, whole
    elif interrupt:
        assert summary["status"] == "partial"
    else:
        assert summary == {"v": "new"}
    assert sorted(p.name for p in root.iterdir()) == ["r"]


# ----------------------------------------------------------------------------- commands


def test_train_refuses_a_finished_run_and_a_user_file_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "homogeneous", "--quiet", "--set", "train.max_time=0.5"]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    before = _tree(tmp_path / "r")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert _tree(tmp_path / "r") == before
    (tmp_path / "r" / "my.yaml").write_text("mine")
    assert main([*args, "--out", str(tmp_path / "r"), "--force"]) == 2
    assert (tmp_path / "r" / "my.yaml").read_text() == "mine"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_is_one_line_and_leaves_a_partial_summary(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    out = tmp_path / "r"
    args = ["train", "homogeneous", "--quiet", "--set", "train.max_time=10000"]
    args += ["--set", "train.stop_at_target=false", "--out", str(out)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from dlion.cli.commands import main; sys.exit(main())",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a background job of a non-interactive shell (CI) starts it: SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # well inside the run
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:  # never leave a 10000 s run behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({sig.name})"), stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "partial" and sig.name in summary["partial_reason"]


def test_a_single_output_file_is_replaced_only_with_force(tmp_path: Path) -> None:
    from dlion.core.errors import BadInput
    from dlion.core.outdir import check_output_file

    target = tmp_path / "decisions.json"
    check_output_file(target)  # new: fine, nothing created
    assert not target.exists()
    target.write_text("mine")
    with pytest.raises(BadInput, match="exists; pass --force"):
        check_output_file(target)
    check_output_file(target, force=True)
    with pytest.raises(BadInput, match="is a directory"):
        check_output_file(tmp_path, force=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInput, match="is a file, not a directory"):
        check_output_file(tmp_path / "afile" / "out.json")


def test_write_atomic_replaces_the_file_or_leaves_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left
    write_atomic(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
