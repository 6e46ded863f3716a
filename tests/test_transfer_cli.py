"""`dlion transfer`: generate, train and bench in-process; bad input is one line and exit 2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dlion.cli.commands import main
from dlion.transfer.data import read_multimodal_npz

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = [
    "data.synthetic.num_samples=900",
    "labels.ks=[10,50]",
    "labels.head_steps=30",
    "labels.scratch_steps=20",
    "labels.scratch_epochs=1",
    "source_train.epochs=2",
    "regression.max_epochs=2",
    "model.conv_channels=[8]",
    "model.mlp_hidden=[16]",
]


def _sets(overrides: list[str]) -> list[str]:
    return [word for item in overrides for word in ("--set", item)]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("error: ")
    return lines[0]


def _bad_npz(tmp_path: Path) -> Path:
    path = tmp_path / "nan.npz"
    audio = np.zeros((20, 4))
    audio[3, 1] = np.nan
    np.savez(path, modality_imu=np.zeros((20, 2, 8)), modality_audio=audio, labels=np.arange(20))
    return path


def _bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("labels:\n  ks: [10, 10]\n")
    return path


BAD_INPUT = [
    (["transfer", "train", "nope.yaml"], "nope.yaml: config file not found"),
    (["transfer", "train", "synthetic", "--set", "labels.kz=[1]"], "labels.kz"),
    (["transfer", "train", "synthetic", "--set", "seed"], "expected KEY=VALUE"),
    (["transfer", "train", "synthetic", "--set", "data.target=video"], "'video'"),
    (["transfer", "train", "synthetic", "--set", "data.path=missing.npz"], "missing.npz"),
    (["transfer", "train", "{bad_yaml}"], "labels: ks"),
    (["transfer", "train", "synthetic", "--set", "data.path={nan_npz}"], "'modality_audio'"),
    (["transfer", "train", "synthetic", "--out", "{a_file}"], "not a directory"),
    (["transfer", "bench", "--seeds", "0"], "--seeds"),
    (["transfer", "bench", "--set", "labels.match_k=7"], "labels: match_k"),
    (["transfer", "generate", "{tmp}/out.txt"], "must end in .npz"),
    (["transfer", "generate", "{tmp}/x.npz", "--set", "data.synthetic.num_classes=2"], "classes"),
    (["transfer", "nosuch"], "nosuch"),
]


@pytest.mark.parametrize(("argv", "words"), BAD_INPUT, ids=[" ".join(a[1:3]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    names = {
        "tmp": str(tmp_path),
        "a_file": str(a_file),
        "bad_yaml": str(_bad_yaml(tmp_path)),
        "nan_npz": str(_bad_npz(tmp_path)),
    }
    argv = [word.format(**names) for word in argv]
    assert main(argv) == 2
    assert words in _one_error_line(capsys)


def test_generate_then_train_on_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "pairs.npz"
    assert main(["transfer", "generate", str(data), *_sets(FAST[:1]), "--set", "seed=4"]) == 0
    loaded = read_multimodal_npz(data, ("imu", "audio"), labels_required=True)
    assert len(loaded) == 900
    out = tmp_path / "run"
    argv = ["transfer", "train", "synthetic", "--out", str(out), "--quiet"]
    argv += _sets([*FAST, f"data.path={data}", "data.source=audio", "data.target=imu"])
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "audio → imu" in captured.out
    assert captured.err == ""
    summary = json.loads((out / "summary.json").read_text())
    # The CLI says, per k, which model the keep-the-better rule kept and on what evidence.
    for choice in summary["few_label_kept"]:
        kept = "few-label head" if choice["kept"] == "few-label" else "zero-label model"
        assert f"k={choice['k']}: kept the {kept}: fine-tuned head " in captured.out
    assert "on 10 held-out labels (5-fold CV)" in captured.out
    assert "on 50 held-out labels (5-fold CV)" in captured.out
    assert (summary["source"], summary["target"], summary["ks"]) == ("audio", "imu", [10, 50])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["data"]["path"] == str(data)
    for name in meta["files"]:
        # safetensors: an 8-byte little-endian header length, then a JSON header.
        raw = (out / name).read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert header["__metadata__"]["format"] == "dlion-transfer"
    assert (out / "accuracy_vs_labels.png").read_bytes().startswith(PNG_MAGIC)
    assert "| audio → imu | 10 |" in (out / "results.md").read_text()


def test_bench_writes_json_markdown_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    argv = ["transfer", "bench", "--seeds", "2", "--out", str(out), "--quiet", *_sets(FAST)]
    assert main(argv) == 0
    assert "4 runs" in capsys.readouterr().out
    report = json.loads((out / "bench.json").read_text())
    assert report["seeds"] == [0, 1]
    assert report["directions"] == [["imu", "audio"], ["audio", "imu"]]
    assert [(r["source"], r["target"], r["seed"]) for r in report["runs"]] == [
        ("imu", "audio", 0),
        ("audio", "imu", 0),
        ("imu", "audio", 1),
        ("audio", "imu", 1),
    ]
    first = report["aggregate"][0]
    mean_zero = (report["runs"][0]["zero_label_acc"] + report["runs"][2]["zero_label_acc"]) / 2
    assert first["zero_label"]["mean"] == pytest.approx(mean_zero)
    markdown = (out / "bench.md").read_text()
    assert "dlion transfer bench synthetic --seeds 2" in markdown
    assert "| imu → audio | 0 (zero-label) |" in markdown
    assert "/2 seeds |" in markdown
    assert (out / "accuracy_vs_labels.png").read_bytes().startswith(PNG_MAGIC)


def test_generate_never_replaces_a_file_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "pairs.npz"
    data.write_bytes(b"the user's own file")
    assert main(["transfer", "generate", str(data), *_sets(FAST[:1])]) == 2
    assert "exists; pass --force" in _one_error_line(capsys)
    assert data.read_bytes() == b"the user's own file"
    assert main(["transfer", "generate", str(data), *_sets(FAST[:1]), "--force"]) == 0
    assert len(read_multimodal_npz(data, ("imu", "audio"), labels_required=True)) == 900
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
