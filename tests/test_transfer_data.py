"""Transfer data: npz reader validation, round trip, and the synthetic generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dlion.core.errors import DataError
from dlion.transfer.config import SyntheticConfig
from dlion.transfer.data import (
    MultimodalData,
    generate_synthetic,
    read_multimodal_npz,
    write_multimodal_npz,
)

N = 12


def _valid() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "modality_imu": rng.standard_normal((N, 3, 16)).astype(np.float32),
        "modality_audio": rng.standard_normal((N, 8)),
        "labels": np.arange(N) % 4,
    }


def _write(tmp_path: Path, arrays: dict[str, Any], name: str = "pairs.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _with(**changes: Any) -> dict[str, Any]:
    arrays = _valid()
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


def _nan_audio() -> np.ndarray:
    x = _valid()["modality_audio"].copy()
    x[5, 2] = np.nan
    return x


def _inf_imu() -> np.ndarray:
    x = _valid()["modality_imu"].copy()
    x[3, 0, 0] = np.inf
    return x


# (case id, arrays, modalities required, labels required, words the message must contain)
BAD_FILES: list[tuple[str, dict[str, Any], tuple[str, ...], bool, tuple[str, ...]]] = [
    (
        "mismatched lengths",
        _with(modality_audio=np.zeros((N - 2, 8))),
        (),
        False,
        ("'modality_imu'", "'modality_audio'", "has 10", "same first dimension"),
    ),
    (
        "labels length",
        _with(labels=np.arange(N - 1)),
        (),
        False,
        ("'labels'", "11 entries", "12 samples"),
    ),
    ("missing modality", _with(modality_audio=None), ("imu", "audio"), False, ("modality_audio",)),
    ("NaN", _with(modality_audio=_nan_audio()), (), False, ("'modality_audio'", "NaN", "5")),
    ("Inf", _with(modality_imu=_inf_imu()), (), False, ("'modality_imu'", "Inf", "3")),
    ("float labels", _with(labels=np.arange(N) / 2), (), False, ("'labels'", "float64")),
    ("bool labels", _with(labels=np.arange(N) % 2 == 0), (), False, ("'labels'", "bool")),
    ("string labels", _with(labels=np.array(["a"] * N)), (), False, ("'labels'", "<U1")),
    ("2-D labels", _with(labels=np.zeros((N, 1), int)), (), False, ("'labels'", "1-D")),
    ("negative labels", _with(labels=np.arange(N) - 1), (), False, ("'labels'", "negative")),
    ("labels required", _with(labels=None), (), True, ("missing 'labels'",)),
    ("unexpected key", _with(x=np.zeros((N, 2))), (), False, ("unexpected array 'x'",)),
    ("bad name", _with(**{"modality_a-b": np.zeros((N, 2))}), (), False, ("'modality_a-b'",)),
    (
        "no modalities",
        {"labels": np.arange(N)},
        (),
        False,
        ("no 'modality_<name>' arrays",),
    ),
    ("1-D modality", _with(modality_audio=np.zeros(N)), (), False, ("'modality_audio'", "shape")),
    (
        "4-D modality",
        _with(modality_imu=np.zeros((N, 2, 2, 2))),
        (),
        False,
        ("'modality_imu'", "shape"),
    ),
    (
        "text modality",
        _with(modality_audio=np.array([["a"]] * N)),
        (),
        False,
        ("'modality_audio'", "numeric"),
    ),
    ("empty", _with(modality_audio=np.zeros((N, 0))), (), False, ("'modality_audio'", "empty")),
]


@pytest.mark.parametrize(
    ("arrays", "require", "labels_required", "words"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_reader_rejects_bad_files_naming_key_and_file(
    tmp_path: Path,
    arrays: dict[str, Any],
    require: tuple[str, ...],
    labels_required: bool,
    words: tuple[str, ...],
) -> None:
    path = _write(tmp_path, arrays)
    with pytest.raises(DataError) as info:
        read_multimodal_npz(path, require, labels_required=labels_required)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    assert "\n" not in message


def test_reader_rejects_object_arrays_without_unpickling(tmp_path: Path) -> None:
    arrays = _valid()
    arrays["modality_audio"] = np.array([object()] * N, dtype=object)
    path = _write(tmp_path, arrays)
    with pytest.raises(DataError, match="cannot read an array"):
        read_multimodal_npz(path)


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"PK\x03\x04truncated"])
def test_reader_rejects_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"bad\.npz"):
        read_multimodal_npz(path)


def test_reader_rejects_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_multimodal_npz(tmp_path / "nope.npz")
    with pytest.raises(DataError, match="not a regular file"):
        read_multimodal_npz(tmp_path)


def test_round_trip_keeps_arrays_and_converts_to_float32(tmp_path: Path) -> None:
    arrays = _valid()
    arrays["modality_audio"] = (arrays["modality_audio"] * 10).astype(np.int16)
    data = read_multimodal_npz(_write(tmp_path, arrays), ("imu", "audio"), labels_required=True)
    assert set(data.modalities) == {"imu", "audio"}
    assert data.modalities["audio"].dtype == np.float32
    np.testing.assert_array_equal(data.modalities["audio"], arrays["modality_audio"])
    assert data.labels is not None and data.labels.dtype == np.int64
    again = read_multimodal_npz(write_multimodal_npz(tmp_path / "again.npz", data))
    np.testing.assert_array_equal(again.modalities["imu"], data.modalities["imu"])
    np.testing.assert_array_equal(again.labels, data.labels)


def test_unlabeled_file_reads_with_labels_none(tmp_path: Path) -> None:
    data = read_multimodal_npz(_write(tmp_path, _with(labels=None)), ("imu",))
    assert data.labels is None
    assert len(data) == N
    part = data.take(np.array([3, 1]))
    np.testing.assert_array_equal(part.modalities["audio"], data.modalities["audio"][[3, 1]])


# ----------------------------------------------------------------------------- generator

SMALL = SyntheticConfig(num_samples=1600)


def test_generator_is_deterministic_per_seed() -> None:
    a, b, c = (generate_synthetic(SMALL, s) for s in (3, 3, 4))
    for name in a.modalities:
        np.testing.assert_array_equal(a.modalities[name], b.modalities[name])
        assert not np.allclose(a.modalities[name], c.modalities[name])
    np.testing.assert_array_equal(a.labels, b.labels)


def test_generator_shapes_and_balanced_classes() -> None:
    cfg = SyntheticConfig(num_samples=240, num_classes=6, imu_channels=4, audio_bins=20)
    data = generate_synthetic(cfg, 0)
    assert data.modalities["imu"].shape == (240, 4, cfg.imu_length)
    assert data.modalities["audio"].shape == (240, 20)
    assert all(x.dtype == np.float32 and np.isfinite(x).all() for x in data.modalities.values())
    assert data.labels is not None
    assert np.bincount(data.labels).tolist() == [40] * 6


def _heldout_accuracy(x: np.ndarray, y: np.ndarray, n_train: int = 1200) -> float:
    """Nearest-class-mean classifier on standardized features: fit on the first n_train."""
    x = x.reshape(len(x), -1)
    x = (x - x[:n_train].mean(axis=0)) / x[:n_train].std(axis=0)
    classes = np.unique(y)
    means = np.stack([x[:n_train][y[:n_train] == c].mean(axis=0) for c in classes])
    dist = ((x[n_train:, None, :] - means[None]) ** 2).sum(axis=2)
    return float((classes[dist.argmin(axis=1)] == y[n_train:]).mean())


def test_each_modality_separates_classes_but_not_trivially() -> None:
    data = generate_synthetic(SMALL, 0)
    assert data.labels is not None
    chance = 1 / SMALL.num_classes
    spectra = np.abs(np.fft.rfft(data.modalities["imu"], axis=2))
    # With the right features (phase-free spectra for the IMU) both modalities carry the class...
    for x in (spectra, data.modalities["audio"]):
        acc = _heldout_accuracy(x, data.labels)
        assert 3 * chance < acc < 0.95
    # ... but the raw IMU window is not linearly separable: the random phases hide it.
    assert _heldout_accuracy(data.modalities["imu"], data.labels) < 2.5 * chance


def test_multimodal_data_len_and_take() -> None:
    data = MultimodalData({"a": np.zeros((5, 2), np.float32)}, np.arange(5))
    assert len(data) == 5
    assert data.take(np.array([4])).labels.tolist() == [4]  # type: ignore[union-attr]
