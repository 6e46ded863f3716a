"""Tests for dlion.data: dataset loaders, file readers and partitioning."""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import socket
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dlion.core.errors import DataError
from dlion.data import (
    DATASET_NAMES,
    PARTITION_SCHEMES,
    Dataset,
    load_dataset,
    partition,
    read_cifar10_batch,
    read_idx,
    read_npz,
)

# ---------------------------------------------------------------- helpers

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
_IDX_CODES.update({np.float32: 0x0D, np.float64: 0x0E})


def idx_bytes(array: np.ndarray) -> bytes:
    code = _IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist_dir(
    directory: Path, n_train: int = 12, n_test: int = 6, *, gz_test: bool = True
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 3).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 4, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 3).astype(np.uint8),
    }
    directory.mkdir(exist_ok=True)
    for name, array in arrays.items():
        gz = gz_test and name.startswith("t10k")
        write_idx(directory / (name + (".gz" if gz else "")), array, gz=gz)
    return arrays


def cifar_batch(n: int, seed: int, *, bytes_keys: bool = True) -> dict[Any, Any]:
    rng = np.random.default_rng(seed)
    batch = {
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "labels": [int(v) for v in rng.integers(0, 10, n)],
        "batch_label": "testing batch",
    }
    return {k.encode(): v for k, v in batch.items()} if bytes_keys else batch


def dump(path: Path, obj: Any, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)
    return path


def assert_same(a: Dataset, b: Dataset) -> None:
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)


def check_dataset(ds: Dataset, input_shape: tuple[int, ...], num_classes: int) -> None:
    assert ds.input_shape == input_shape
    assert ds.num_classes == num_classes
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == input_shape
        assert y.shape == (len(x),) and len(x) > 0
        assert int(y.min()) >= 0 and int(y.max()) < num_classes


# ---------------------------------------------------------------- load_dataset basics


def test_dataset_names_are_the_documented_set() -> None:
    assert DATASET_NAMES == ("digits", "mnist1d", "synthetic", "mnist-idx", "cifar10", "npz")


def test_unknown_dataset_name_is_rejected() -> None:
    with pytest.raises(DataError, match="imagenet"):
        load_dataset("imagenet")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction_is_rejected(fraction: float) -> None:
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("digits", test_fraction=fraction)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 100.0}, "num_samples"),
    ],
)
def test_bad_seed_or_num_samples_is_rejected(kwargs: dict[str, Any], parameter: str) -> None:
    with pytest.raises(DataError, match=parameter):
        load_dataset("synthetic", **kwargs)


@pytest.mark.parametrize("name", ["mnist-idx", "cifar10", "npz"])
def test_file_datasets_need_a_path(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=name):
        load_dataset(name)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        load_dataset(name, path=str(missing))


# ---------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range() -> None:
    ds = load_dataset("digits", test_fraction=0.25)
    check_dataset(ds, (1, 8, 8), 10)
    assert ds.name == "digits"
    total = len(ds.x_train) + len(ds.x_test)
    assert total == 1797
    assert len(ds.x_test) == pytest.approx(0.25 * total, abs=1)
    for x in (ds.x_train, ds.x_test):
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_digits_deterministic_per_seed() -> None:
    assert_same(load_dataset("digits", seed=3), load_dataset("digits", seed=3))
    other = load_dataset("digits", seed=4)
    assert not torch.equal(load_dataset("digits", seed=3).y_test, other.y_test)


def test_digits_split_is_stratified() -> None:
    ds = load_dataset("digits", test_fraction=0.2)
    all_counts = np.bincount(np.concatenate([ds.y_train.numpy(), ds.y_test.numpy()]))
    test_counts = np.bincount(ds.y_test.numpy(), minlength=10)
    # Stratified: each class's test share matches its overall share to within one sample.
    expected = all_counts * len(ds.y_test) / all_counts.sum()
    assert np.all(np.abs(test_counts - expected) <= 1.0)


# ---------------------------------------------------------------- mnist1d


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network access attempted")

    import requests

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("DLION_CACHE_DIR", str(directory))
    return directory


def test_mnist1d_generates_offline_and_standardises(no_network: None, cache: Path) -> None:
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ds = load_dataset("mnist1d", num_samples=100, seed=1)
    check_dataset(ds, (1, 40), 10)
    assert (len(ds.x_train), len(ds.x_test)) == (80, 20)
    # Per-feature standardisation on train.
    mean = ds.x_train.mean(dim=0)
    std = ds.x_train.std(dim=0, unbiased=False)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-4)
    # The generator reseeds numpy's global RNG; the loader must put it back.
    assert np.array_equal(np.random.get_state()[1], before)


def test_mnist1d_second_load_reads_cache(
    no_network: None, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_dataset("mnist1d", num_samples=100, seed=1)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    assert not list(cache.glob("*.tmp"))

    import mnist1d.data

    def must_not_generate(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("regenerated despite cache")

    monkeypatch.setattr(mnist1d.data, "make_dataset", must_not_generate)
    assert_same(first, load_dataset("mnist1d", num_samples=100, seed=1))
    # A different generator argument is a different cache entry, so it must generate.
    with pytest.raises(AssertionError, match="regenerated"):
        load_dataset("mnist1d", num_samples=100, seed=2)


def test_mnist1d_unreadable_cache_is_regenerated(no_network: None, cache: Path) -> None:
    first = load_dataset("mnist1d", num_samples=100, seed=5)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"not an npz at all")
    second = load_dataset("mnist1d", num_samples=100, seed=5)
    assert_same(first, second)
    with np.load(cache_file, allow_pickle=False) as npz:
        assert set(npz.files) == {"x", "y", "x_test", "y_test"}


def test_mnist1d_seeds_differ_and_too_few_samples_rejected(cache: Path) -> None:
    a = load_dataset("mnist1d", num_samples=50, seed=1)
    b = load_dataset("mnist1d", num_samples=50, seed=2)
    assert not torch.equal(a.x_train, b.x_train)
    with pytest.raises(DataError, match="num_samples"):
        load_dataset("mnist1d", num_samples=5)


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_seed_dependent() -> None:
    a = load_dataset("synthetic", seed=7, num_samples=500, num_features=12, num_classes=4)
    check_dataset(a, (12,), 4)
    assert len(a.x_train) + len(a.x_test) == 500
    assert set(a.y_train.tolist()) == {0, 1, 2, 3}
    assert_same(
        a, load_dataset("synthetic", seed=7, num_samples=500, num_features=12, num_classes=4)
    )
    b = load_dataset("synthetic", seed=8, num_samples=500, num_features=12, num_classes=4)
    assert not torch.equal(a.x_train, b.x_train)


def test_synthetic_is_learnable_but_not_trivial() -> None:
    from sklearn.linear_model import LogisticRegression

    ds = load_dataset("synthetic", seed=0, num_samples=2000)
    check_dataset(ds, (32,), 10)
    model = LogisticRegression(max_iter=500).fit(ds.x_train.numpy(), ds.y_train.numpy())
    accuracy = model.score(ds.x_test.numpy(), ds.y_test.numpy())
    assert 0.25 < accuracy < 0.95  # chance is 0.10


def test_synthetic_bad_parameters() -> None:
    with pytest.raises(DataError, match="num_classes"):
        load_dataset("synthetic", num_classes=1)
    with pytest.raises(DataError, match="num_samples"):
        load_dataset("synthetic", num_samples=5, num_classes=10)
    with pytest.raises(DataError, match="num_features"):
        load_dataset("synthetic", num_features=1)


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_images_and_labels(tmp_path: Path, gz: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    labels = np.array([7, 0, 255], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    got_images = read_idx(write_idx(tmp_path / f"img{suffix}", images, gz=gz))
    got_labels = read_idx(write_idx(tmp_path / f"lab{suffix}", labels, gz=gz))
    assert got_images.dtype == np.uint8 and np.array_equal(got_images, images)
    assert got_labels.dtype == np.uint8 and np.array_equal(got_labels, labels)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_other_dtypes_big_endian(tmp_path: Path, dtype: type) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 12).astype(dtype)
    got = read_idx(write_idx(tmp_path / "a.idx", array))
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, array)


def test_read_idx_gzip_detected_by_magic_without_suffix(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(read_idx(write_idx(tmp_path / "plain-name", array, gz=True)), array)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))[:-4]
    path = tmp_path / ("short-file.gz" if gz else "short-file")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=r"short-file.*truncated: expected 18 bytes.*found 14"):
        read_idx(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "magic"),
        (b"\x00\x00\x42\x01\x00\x00\x00\x01\x05", "dtype code"),
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06", "trailing"),
        (b"\x1f\x8b\x08\x00garbage-not-deflate", "gzip"),
    ],
    ids=["bad-magic", "bad-dtype", "short-header", "short-dims", "trailing", "corrupt-gzip"],
)
def test_read_idx_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert "broken-idx" in str(info.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent-file"):
        read_idx(tmp_path / "absent-file")


def test_mnist_idx_end_to_end(tmp_path: Path) -> None:
    arrays = write_mnist_dir(tmp_path / "mnist")
    ds = load_dataset("mnist-idx", path=str(tmp_path / "mnist"))
    check_dataset(ds, (1, 4, 5), 3)
    assert ds.name == "mnist-idx"
    expected = arrays["train-images-idx3-ubyte"][:, None].astype(np.float32) / 255.0
    assert np.allclose(ds.x_train.numpy(), expected)
    assert np.array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert float(ds.x_train.max()) <= 1.0 and float(ds.x_train.min()) >= 0.0


def test_mnist_idx_mismatched_counts(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.zeros(11, dtype=np.uint8))
    with pytest.raises(DataError, match=r"12 images.*11.*labels"):
        load_dataset("mnist-idx", path=str(tmp_path / "mnist"))


def test_mnist_idx_missing_file(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path / "mnist")
    os.remove(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist-idx", path=str(tmp_path / "mnist"))


# ---------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_end_to_end(tmp_path: Path, protocol: int) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    batches = {"data_batch_1": cifar_batch(4, 1), "data_batch_2": cifar_batch(3, 2)}
    batches["test_batch"] = cifar_batch(2, 3, bytes_keys=False)  # str keys are accepted too
    for name, batch in batches.items():
        dump(directory / name, batch, protocol)
    ds = load_dataset("cifar10", path=str(directory))
    check_dataset(ds, (3, 32, 32), 10)
    assert (len(ds.x_train), len(ds.x_test)) == (7, 2)
    train_bytes = np.concatenate(
        [batches["data_batch_1"][b"data"], batches["data_batch_2"][b"data"]]
    )
    expected = train_bytes.reshape(7, 3, 32, 32).astype(np.float32) / 255.0
    assert np.allclose(ds.x_train.numpy(), expected)
    labels = batches["data_batch_1"][b"labels"] + batches["data_batch_2"][b"labels"]
    assert ds.y_train.tolist() == labels


def test_read_cifar10_batch_exact(tmp_path: Path) -> None:
    batch = cifar_batch(5, 9)
    images, labels = read_cifar10_batch(dump(tmp_path / "b", batch))
    assert images.dtype == np.uint8 and images.shape == (5, 3, 32, 32)
    assert np.array_equal(images.reshape(5, -1), batch[b"data"])
    # Channel-first layout: the first 1024 bytes of a row are the red plane.
    assert np.array_equal(images[0, 0].ravel(), batch[b"data"][0, :1024])
    assert labels.dtype == np.int64 and labels.tolist() == batch[b"labels"]


def test_cifar10_needs_test_batch(tmp_path: Path) -> None:
    dump(tmp_path / "data_batch_1", cifar_batch(2, 0))
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", path=str(tmp_path))


def test_cifar10_truncated_pickle(tmp_path: Path) -> None:
    raw = pickle.dumps(cifar_batch(3, 0))
    (tmp_path / "cut-batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut-batch"):
        read_cifar10_batch(tmp_path / "cut-batch")


class _Payload:
    """Pickles as a call to os.system that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Payload, _EvalPayload])
def test_cifar10_malicious_pickle_does_not_run(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    batch = cifar_batch(2, 0)
    batch[b"labels"] = payload(marker)
    path = dump(tmp_path / "evil_batch", batch)
    # Sanity check that the payload is real: the unrestricted unpickler would run it.
    assert b"system" in path.read_bytes() or b"eval" in path.read_bytes()
    with pytest.raises(DataError, match="not allowed"):
        read_cifar10_batch(path)
    assert not marker.exists()


class _CodecPayload:
    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (codecs.encode, ("abc", "base64"))


def test_cifar10_codecs_encode_limited_to_latin1(tmp_path: Path) -> None:
    # _codecs.encode is allowed for protocol-2 bytes, but only with latin1.
    path = dump(tmp_path / "codec-batch", {b"labels": _CodecPayload()}, protocol=2)
    assert b"_codecs" in path.read_bytes()
    with pytest.raises(DataError, match="latin1"):
        read_cifar10_batch(path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.pop(b"labels"), "labels"),
        (lambda b: b.update({b"data": b[b"data"][:, :100]}), "shape"),
        (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "uint8"),
        (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "counts must match"),
        (lambda b: b.update({b"labels": [10] * len(b[b"labels"])}), r"0\.\.9"),
    ],
    ids=["no-labels", "bad-shape", "bad-dtype", "count-mismatch", "label-range"],
)
def test_cifar10_bad_batch_contents(tmp_path: Path, mutate: Any, message: str) -> None:
    batch = cifar_batch(3, 0)
    mutate(batch)
    with pytest.raises(DataError, match=message):
        read_cifar10_batch(dump(tmp_path / "b", batch))


# ---------------------------------------------------------------- npz


def test_npz_with_explicit_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(20, 2, 3)), rng.normal(size=(6, 2, 3))
    y, y_test = np.arange(20) % 4, np.arange(6) % 5
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    ds = load_dataset("npz", path=str(path))
    check_dataset(ds, (2, 3), 5)  # max label over train and test is 4
    assert np.allclose(ds.x_train.numpy(), x.astype(np.float32))
    assert ds.y_test.tolist() == y_test.tolist()


def test_npz_split_when_no_test_arrays(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = np.arange(40) % 2
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y.astype(np.float64))  # whole-number float labels are accepted
    ds = load_dataset("npz", path=str(path), test_fraction=0.25, seed=1)
    check_dataset(ds, (3,), 2)
    assert (len(ds.x_train), len(ds.x_test)) == (30, 10)
    assert ds.y_test.tolist().count(0) == 5  # stratified
    assert_same(ds, load_dataset("npz", path=str(path), test_fraction=0.25, seed=1))
    # The split covers every sample exactly once.
    rows = np.concatenate([ds.x_train.numpy(), ds.x_test.numpy()])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, x.tolist()))


_GOOD_X = np.ones((4, 2))
_GOOD_Y = np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": _GOOD_Y}, "missing array 'x'"),
        ({"x": _GOOD_X}, "missing array 'y'"),
        ({"x": _GOOD_X, "y": _GOOD_Y[:3]}, "4 samples.*3"),
        ({"x": np.array([[np.nan, 1.0]] * 4), "y": _GOOD_Y}, "NaN"),
        ({"x": np.array([[np.inf, 1.0]] * 4), "y": _GOOD_Y}, "Inf"),
        ({"x": _GOOD_X, "y": np.array([0.5, 1.0, 0.0, 1.0])}, "integer"),
        ({"x": _GOOD_X, "y": np.array([0, -1, 0, 1])}, "negative"),
        ({"x": np.ones(4), "y": _GOOD_Y}, "shape"),
        ({"x": _GOOD_X, "y": _GOOD_Y.reshape(2, 2)}, "1-D"),
        ({"x": np.array([["a", "b"]] * 4), "y": _GOOD_Y}, "numeric"),
        ({"x": _GOOD_X, "y": _GOOD_Y, "x_test": _GOOD_X}, "together"),
        (
            {"x": _GOOD_X, "y": _GOOD_Y, "x_test": np.ones((2, 3)), "y_test": _GOOD_Y[:2]},
            "shape",
        ),
        ({"x": np.array([[1], [2]], dtype=object), "y": _GOOD_Y[:2]}, "npz"),
    ],
    ids=[
        "missing-x",
        "missing-y",
        "length-mismatch",
        "nan",
        "inf",
        "float-labels",
        "negative-labels",
        "x-1d",
        "y-2d",
        "x-strings",
        "x_test-alone",
        "test-shape",
        "object-array",
    ],
)
def test_npz_bad_contents(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad-data.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=message) as info:
        read_npz(path)
    assert "bad-data.npz" in str(info.value)
    with pytest.raises(DataError):
        load_dataset("npz", path=str(path))


def test_npz_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match=r"junk\.npz"):
        read_npz(path)


# ---------------------------------------------------------------- partition


def _labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_partition_disjoint_covering_min_size_deterministic(scheme: str) -> None:
    labels = _labels()
    parts = partition(labels, 7, scheme, seed=3, min_size=20)
    assert len(parts) == 7
    assert all(p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))  # disjoint
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))  # covering
    assert min(len(p) for p in parts) >= 20
    again = partition(labels, 7, scheme, seed=3, min_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(labels, 7, scheme, seed=4, min_size=20)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_partition_iid_sizes_near_equal() -> None:
    sizes = [len(p) for p in partition(_labels(1003), 10, "iid")]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=10) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_partition_dirichlet_small_alpha_is_skewed() -> None:
    labels = _labels(2000)
    iid = _mean_label_entropy(labels, partition(labels, 10, "iid"))
    skewed = _mean_label_entropy(labels, partition(labels, 10, "dirichlet", alpha=0.1))
    mild = _mean_label_entropy(labels, partition(labels, 10, "dirichlet", alpha=100.0))
    assert iid > 0.95 * np.log(10)
    assert skewed < 0.6 * iid
    assert mild > skewed


def test_partition_shards_limit_labels_per_part() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 10, "shards", shards_per_part=2, seed=1)
    # Shards of 50 sorted samples never straddle a class here, so each part sees at most 2 labels.
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)


def test_partition_dirichlet_infeasible_min_size() -> None:
    labels = _labels(100)
    with pytest.raises(DataError, match="min_size"):
        partition(labels, 10, "dirichlet", alpha=0.01, min_size=10)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"num_parts": 0}, "num_parts"),
        ({"num_parts": 101}, "num_parts"),
        ({"num_parts": 2.5}, "num_parts"),
        ({"scheme": "random"}, "scheme"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
        ({"scheme": "shards", "shards_per_part": 0}, "shards_per_part"),
        ({"scheme": "shards", "shards_per_part": 30}, "shards_per_part"),
        ({"min_size": 50}, "min_size"),
        ({"min_size": -1}, "min_size"),
        ({"seed": -3}, "seed"),
    ],
)
def test_partition_bad_arguments(kwargs: dict[str, Any], parameter: str) -> None:
    args: dict[str, Any] = {"num_parts": 4, **kwargs}
    with pytest.raises(DataError, match=parameter):
        partition(_labels(100), **args)


def test_partition_bad_labels() -> None:
    with pytest.raises(DataError, match="labels"):
        partition(np.zeros((4, 2), dtype=np.int64), 2)
    with pytest.raises(DataError, match="labels"):
        partition(np.array([0.5, 1.5]), 2)
