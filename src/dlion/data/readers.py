"""Readers for dataset files (IDX, CIFAR-10 pickles, npz) that turn bad content into DataError."""

from __future__ import annotations

import gzip
import io
import math
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from dlion.core.errors import DataError

__all__ = ["read_cifar10_batch", "read_idx", "read_npz", "validate_arrays"]

# IDX dtype code -> big-endian numpy dtype (see http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"

CIFAR_IMAGE_SHAPE = (3, 32, 32)
CIFAR_NUM_CLASSES = 10


# Class ids at or above this are a corrupt or mislabelled file, not a task: a model has one
# output per class, so a label of 10**9 would ask for hundreds of GB before any check.
MAX_CLASSES = 100_000


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")


def _read_bytes(path: Path) -> bytes:
    _check_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into an array in native byte order."""
    path = Path(path)
    raw = _read_bytes(path)
    # Decide on compression by content first, so a renamed or mislabelled file still works.
    if raw[:2] == _GZIP_MAGIC or path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip data: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: bad IDX magic {raw[:4].hex()} (must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    if ndim < 1:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{path}: truncated: header needs {header_len} bytes for {ndim} dimensions, "
            f"found {len(raw)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    found = len(raw) - header_len
    if found < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes of data, found {found}")
    if found > expected:
        raise DataError(
            f"{path}: {found - expected} trailing bytes: expected {expected} bytes of data, "
            f"found {found}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    # Copy into native byte order so callers get an ordinary, writable array.
    return data.astype(dtype.newbyteorder("="))


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(text, "latin1"); accept only that,
    # so a pickle cannot drive an arbitrary codec lookup.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the few globals needed for dicts of numpy arrays.

    CIFAR-10 batches are pickles, and unpickling an untrusted file with the plain unpickler can
    run arbitrary code (any callable reachable by module and name can be invoked via REDUCE).
    Containers, numbers, strings and bytes need no globals at all, so refusing every global except
    numpy's array reconstruction helpers keeps real batches loadable and makes payloads inert.
    """

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _get_key(batch: dict[Any, Any], key: str) -> Any:
    # Original batches were pickled by Python 2 and load with bytes keys; accept str keys too.
    if key.encode() in batch:
        return batch[key.encode()]
    if key in batch:
        return batch[key]
    return None


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: uint8 images (n, 3, 32, 32) and int64 labels (n,)."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        # Any failure while unpickling means the file is not a usable batch; the unpickler is
        # restricted, so no code from the file ran.
        raise DataError(f"{path}: not a readable CIFAR-10 batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    data = _get_key(batch, "data")
    labels = _get_key(batch, "labels")
    if data is None or labels is None:
        raise DataError(f"{path}: batch must contain 'data' and 'labels'")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be a uint8 array")
    row = math.prod(CIFAR_IMAGE_SHAPE)
    if data.ndim != 2 or data.shape[1] != row:
        raise DataError(f"{path}: 'data' must have shape (n, {row}), found {data.shape}")
    try:
        label_array = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: 'labels' is not a list of integers") from exc
    if label_array.ndim != 1 or not np.issubdtype(label_array.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be a flat list of integers")
    if len(label_array) != len(data):
        raise DataError(
            f"{path}: {len(data)} images but {len(label_array)} labels; counts must match"
        )
    if len(label_array) and (label_array.min() < 0 or label_array.max() >= CIFAR_NUM_CLASSES):
        raise DataError(f"{path}: labels must lie in 0..{CIFAR_NUM_CLASSES - 1}")
    images = np.ascontiguousarray(data).reshape((len(data), *CIFAR_IMAGE_SHAPE))
    return images, label_array.astype(np.int64)


def validate_arrays(x: Any, y: Any, where: str, x_name: str = "x", y_name: str = "y") -> np.ndarray:
    """Check a feature array and its labels; return the labels as int64. `where` prefixes errors."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataError(f"{where}: '{x_name}' and '{y_name}' must be arrays")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{where}: '{x_name}' must be numeric (int or float), found {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{where}: '{x_name}' must have shape (n, ...features), found {x.shape}")
    if len(x) == 0:
        raise DataError(f"{where}: '{x_name}' has no samples")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{where}: '{x_name}' contains NaN or Inf")
    if y.ndim != 1:
        raise DataError(f"{where}: '{y_name}' must be 1-D, found shape {y.shape}")
    if len(y) != len(x):
        raise DataError(
            f"{where}: '{x_name}' has {len(x)} samples but '{y_name}' has {len(y)}; must match"
        )
    if np.issubdtype(y.dtype, np.floating):
        # Labels saved as whole-number floats are common; anything else is not a class id.
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise DataError(f"{where}: '{y_name}' must hold integer class labels")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: '{y_name}' must hold integer class labels, found {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{where}: '{y_name}' has negative labels")
    if y.max() >= MAX_CLASSES:
        # Checked before anything is sized by the label range (one model output per class).
        raise DataError(
            f"{where}: '{y_name}' has label {int(y.max())}; class ids must be below {MAX_CLASSES}"
        )
    return y.astype(np.int64)


def load_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz file, never unpickling; any problem is a DataError naming it."""
    _check_file(path)
    try:
        # allow_pickle=False: object arrays would be unpickled, which can run code.
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        # np.load raises many types (OSError, ValueError, BadZipFile, EOFError) for bad files.
        raise DataError(f"{path}: not a readable npz file: {exc}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an npz archive (a single .npy array?)")
    try:
        with loaded as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as exc:
        # A member can be corrupt, truncated or an object array refused by allow_pickle=False.
        raise DataError(f"{path}: cannot read an array from the npz: {exc}") from None


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate an npz: 'x', 'y', optionally 'x_test', 'y_test'; labels as int64."""
    path = Path(path)
    arrays = load_npz_arrays(path)
    keys = set(arrays)
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (found {sorted(keys)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: 'x_test' and 'y_test' must be given together")
    out = {"x": arrays["x"], "y": validate_arrays(arrays["x"], arrays["y"], str(path))}
    if "x_test" in arrays:
        y_test = validate_arrays(arrays["x_test"], arrays["y_test"], str(path), "x_test", "y_test")
        if arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
            raise DataError(
                f"{path}: 'x_test' samples have shape {arrays['x_test'].shape[1:]} but 'x' "
                f"samples have {arrays['x'].shape[1:]}"
            )
        out["x_test"] = arrays["x_test"]
        out["y_test"] = y_test
    return out
