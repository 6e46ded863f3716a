"""Split a labelled dataset across workers: iid, Dirichlet label skew, or label shards."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from dlion.core.errors import DataError

__all__ = ["PARTITION_SCHEMES", "partition"]

PARTITION_SCHEMES = ("iid", "dirichlet", "shards")

# Dirichlet draws are redrawn until every part is big enough; past this many tries the request is
# almost certainly infeasible for the given alpha, so fail instead of looping forever.
_DIRICHLET_MAX_TRIES = 1000


def partition(
    labels: np.ndarray,
    num_parts: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    shards_per_part: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Return `num_parts` disjoint, sorted int64 index arrays into `labels`, one per part.

    Every scheme covers all indices. `alpha` is used by "dirichlet" only, `shards_per_part` by
    "shards" only. Each part gets at least `min_size` samples, or DataError is raised.
    """
    if scheme not in PARTITION_SCHEMES:
        raise DataError(
            f"scheme: unknown partition scheme {scheme!r}; choose one of "
            f"{', '.join(PARTITION_SCHEMES)}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels: must be 1-D, found shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels: must be integers, found {labels.dtype}")
    n = len(labels)
    _check_int("num_parts", num_parts, 1)
    if num_parts > n:
        raise DataError(f"num_parts: {num_parts} parts but only {n} samples")
    _check_int("min_size", min_size, 0)
    if num_parts * min_size > n:
        raise DataError(
            f"min_size: {num_parts} parts of at least {min_size} samples need "
            f"{num_parts * min_size}, but there are only {n}"
        )
    _check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(n, int(num_parts), rng)
    elif scheme == "dirichlet":
        is_real = isinstance(alpha, Real) and not isinstance(alpha, bool)
        if not is_real or not math.isfinite(alpha) or alpha <= 0:
            raise DataError(f"alpha: must be a finite number > 0, got {alpha!r}")
        parts = _dirichlet(labels, int(num_parts), float(alpha), int(min_size), rng)
    else:
        _check_int("shards_per_part", shards_per_part, 1)
        if num_parts * shards_per_part > n:
            raise DataError(
                f"shards_per_part: {num_parts} parts x {shards_per_part} shards need at least "
                f"{num_parts * shards_per_part} samples, but there are only {n}"
            )
        parts = _shards(labels, int(num_parts), int(shards_per_part), rng)
    sizes = [len(p) for p in parts]
    if min(sizes) < min_size:
        raise DataError(
            f"min_size: scheme {scheme!r} gave a part only {min(sizes)} samples, "
            f"fewer than min_size={min_size}"
        )
    return [np.sort(p).astype(np.int64) for p in parts]


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an Integral too, but True as a part count is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise DataError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _iid(n: int, num_parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), num_parts))


def _dirichlet(
    labels: np.ndarray, num_parts: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    # Per class, draw part proportions from Dir(alpha) and cut that class's samples accordingly
    # (Hsu et al. 2019; NIID-Bench). Redraw everything until every part reaches min_size.
    n = len(labels)
    classes = np.unique(labels)
    for _ in range(_DIRICHLET_MAX_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        sizes = np.zeros(num_parts, dtype=np.int64)
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            props = rng.dirichlet(np.full(num_parts, alpha))
            # NIID-Bench balancing: parts already holding their fair share get no more, which
            # keeps sizes from running away without removing the label skew.
            capped = props * (sizes < n / num_parts)
            if capped.sum() > 0:
                props = capped
            props = props / props.sum()
            cuts = (np.cumsum(props) * len(idx)).astype(np.int64)[:-1]
            for part, chunk in enumerate(np.split(idx, cuts)):
                buckets[part].append(chunk)
                sizes[part] += len(chunk)
        if sizes.min() >= min_size:
            return [np.concatenate(b) if b else np.empty(0, dtype=np.int64) for b in buckets]
    raise DataError(
        f"alpha: dirichlet partition with alpha={alpha} could not give each of {num_parts} parts "
        f"at least min_size={min_size} samples in {_DIRICHLET_MAX_TRIES} tries; raise alpha or "
        f"lower num_parts or min_size"
    )


def _shards(
    labels: np.ndarray, num_parts: int, shards_per_part: int, rng: np.random.Generator
) -> list[np.ndarray]:
    # Shuffle before the stable sort so samples within a class land in shards at random.
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, num_parts * shards_per_part)
    assignment = rng.permutation(len(shards)).reshape(num_parts, shards_per_part)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]
