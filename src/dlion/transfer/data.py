"""Multimodal data for RecycleML-style transfer (EdgeSys '18): the npz reader and a generator.

File format (`.npz`, read with allow_pickle=False):

- `modality_<name>`: one array per modality, all with the same first dimension n (sample i of
  every modality is recorded at the same time). Shape `(n, features)` is a feature vector
  (an MLP encodes it), `(n, channels, length)` is a multichannel time series (a 1-D CNN).
  Numeric, finite. `<name>` is letters, digits and `_`.
- `labels` (optional): integer class ids `(n,)`, >= 0. A file of unlabeled pairs leaves it out.

Any other key is an error, so a misspelled key is never silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlion.core.errors import DataError
from dlion.data.readers import load_npz_arrays
from dlion.transfer.config import SyntheticConfig

PREFIX = "modality_"
LABELS = "labels"
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class MultimodalData:
    """Synchronized samples: row i of every modality and of `labels` is the same moment."""

    modalities: dict[str, np.ndarray]  # name -> float32 (n, d) or (n, channels, length)
    labels: np.ndarray | None  # int64 (n,), or None for unlabeled pairs

    def __len__(self) -> int:
        return len(next(iter(self.modalities.values())))

    def take(self, index: np.ndarray) -> MultimodalData:
        """The samples at `index`, in that order."""
        labels = None if self.labels is None else self.labels[index]
        return MultimodalData({k: v[index] for k, v in self.modalities.items()}, labels)


def _check_modality(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    if x.dtype == np.bool_ or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise DataError(f"{path}: '{key}' must be numeric (int or float), found {x.dtype}")
    if x.ndim not in (2, 3):
        raise DataError(
            f"{path}: '{key}' must have shape (n, features) or (n, channels, length), "
            f"found {x.shape}"
        )
    if len(x) == 0 or x[0].size == 0:
        raise DataError(f"{path}: '{key}' is empty, shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.argmax(~np.isfinite(x).reshape(len(x), -1).all(axis=1)))
        raise DataError(f"{path}: '{key}' contains NaN or Inf (first at sample {bad})")
    return x.astype(np.float32)


def _check_labels(path: Path, y: np.ndarray, n: int) -> np.ndarray:
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: '{LABELS}' must hold integer class ids, found dtype {y.dtype} "
            "(save them with .astype(np.int64))"
        )
    if y.ndim != 1:
        raise DataError(f"{path}: '{LABELS}' must be 1-D, found shape {y.shape}")
    if len(y) != n:
        raise DataError(
            f"{path}: '{LABELS}' has {len(y)} entries but the modalities have {n} samples; "
            "all arrays must have the same first dimension"
        )
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: '{LABELS}' has negative class ids (min {y.min()})")
    return y.astype(np.int64)


def read_multimodal_npz(
    path: str | Path, require: Iterable[str] = (), *, labels_required: bool = False
) -> MultimodalData:
    """Read and validate a multimodal npz; `require` names modalities that must be present."""
    path = Path(path)
    arrays = load_npz_arrays(path)

    modalities: dict[str, np.ndarray] = {}
    for key in sorted(arrays):
        if key == LABELS:
            continue
        name = key.removeprefix(PREFIX)
        if not key.startswith(PREFIX) or not _NAME.match(name):
            raise DataError(
                f"{path}: unexpected array '{key}'; keys must be '{PREFIX}<name>' or '{LABELS}'"
            )
        modalities[name] = _check_modality(path, key, arrays[key])
    if not modalities:
        raise DataError(f"{path}: no '{PREFIX}<name>' arrays (found {sorted(arrays)})")
    for name in require:
        if name not in modalities:
            found = ", ".join(PREFIX + m for m in modalities)
            raise DataError(
                f"{path}: missing '{PREFIX}{name}' for modality {name!r} (found {found})"
            )

    first = next(iter(modalities))
    n = len(modalities[first])
    for name, x in modalities.items():
        if len(x) != n:
            raise DataError(
                f"{path}: '{PREFIX}{name}' has {len(x)} samples but '{PREFIX}{first}' has {n}; "
                "all arrays must have the same first dimension"
            )
    labels = _check_labels(path, arrays[LABELS], n) if LABELS in arrays else None
    if labels_required and labels is None:
        raise DataError(f"{path}: missing '{LABELS}' (integer class ids, one per sample)")
    return MultimodalData(modalities, labels)


def write_multimodal_npz(path: str | Path, data: MultimodalData) -> Path:
    """Write `data` in the documented format (compressed npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {PREFIX + name: x for name, x in data.modalities.items()}
    if data.labels is not None:
        arrays[LABELS] = data.labels
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # numpy stub: **arrays vs allow_pickle
    return path


# ----------------------------------------------------------------------------- synthetic


def generate_synthetic(cfg: SyntheticConfig, seed: int) -> MultimodalData:
    """Activities as a hidden process z, rendered into two sensors that see it differently.

    Each class has a mean activity vector; a sample's z is that mean plus within-class spread.
    Component j of z sets the strength of one motion rhythm and of one sound band:

    - `imu` (channels, length): rhythm j is a sinusoid at its own frequency with a random
      phase per sample, mixed into the channels, plus white noise. Reading z needs
      frequency-selective filters that ignore phase (a CNN).
    - `audio` (bins,): band j is a Gaussian bump of the spectrum; the log spectrum gets a
      random loudness offset per sample and noise.

    The strengths enter through different nonlinearities (exp vs softplus), so the two
    modalities share the activity but not a linear map between them.
    """
    rng = np.random.default_rng(seed)
    n, c, d = cfg.num_samples, cfg.num_classes, cfg.latent_dim
    means = rng.standard_normal((c, d))
    labels = np.arange(n) % c
    rng.shuffle(labels)
    z = means[labels] + cfg.class_spread * rng.standard_normal((n, d))

    # imu: rhythm j at a distinct frequency (cycles per window), mixed into channels.
    t = np.arange(cfg.imu_length) / cfg.imu_length
    freqs = np.linspace(3.0, cfg.imu_length / 5, d) + rng.uniform(-0.3, 0.3, d)
    mixing = rng.standard_normal((cfg.imu_channels, d)) / np.sqrt(d)
    phase = rng.uniform(0.0, 2 * np.pi, (n, d, 1))
    strength = np.exp(0.6 * z)[:, :, None]  # (n, d, 1)
    rhythms = strength * np.sin(2 * np.pi * freqs[None, :, None] * t[None, None, :] + phase)
    imu = np.einsum("cd,ndt->nct", mixing, rhythms)
    imu /= imu.std()
    imu += cfg.imu_noise * rng.standard_normal(imu.shape)

    # audio: band j is a bump centered on its own bin; log power with a loudness offset.
    bins = np.arange(cfg.audio_bins)
    centers = np.linspace(2, cfg.audio_bins - 3, d)
    width = 0.6 * cfg.audio_bins / d
    bands = np.exp(-0.5 * ((bins[None, :] - centers[:, None]) / width) ** 2)  # (d, bins)
    energy = np.logaddexp(0.0, 1.5 * z)  # softplus
    audio = np.log(energy @ bands + 0.05)
    audio += 0.5 * rng.standard_normal((n, 1))  # loudness: same offset on every bin
    audio = (audio - audio.mean()) / audio.std()
    audio += cfg.audio_noise * rng.standard_normal(audio.shape)

    modalities = {"imu": imu.astype(np.float32), "audio": audio.astype(np.float32)}
    return MultimodalData(modalities, labels.astype(np.int64))
