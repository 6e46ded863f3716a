"""The sim's fast paths give the same numbers, bit for bit, as the plain versions they replace."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence

import pytest

from dlion.engines.network import max_min_rates

_SATURATED = 1e-12


def reference_max_min_rates(
    paths: Sequence[Sequence[Hashable]], capacity: Callable[[Hashable], float]
) -> list[float]:
    """Progressive filling as first written (every round adds the share to every unfrozen
    flow and scans every flow's path): the definition the fast version must match."""
    remaining_cap: dict[Hashable, float] = {}
    full: dict[Hashable, float] = {}
    users: dict[Hashable, int] = {}
    for path in paths:
        for r in path:
            if r not in remaining_cap:
                remaining_cap[r] = full[r] = capacity(r)
                users[r] = 0
            users[r] += 1
    rates = [0.0] * len(paths)
    active = [i for i, path in enumerate(paths) if path]
    while active:
        share = min(remaining_cap[r] / n for r, n in users.items() if n > 0)
        for i in active:
            rates[i] += share
        for r, n in users.items():
            if n > 0:
                remaining_cap[r] -= share * n
        saturated = {
            r for r, n in users.items() if n > 0 and remaining_cap[r] <= _SATURATED * full[r]
        }
        still_active = []
        for i in active:
            if any(r in saturated for r in paths[i]):
                for r in paths[i]:
                    users[r] -= 1
            else:
                still_active.append(i)
        active = still_active
    return rates


@pytest.mark.parametrize("seed", range(200))
def test_fast_max_min_rates_equal_the_reference_bit_for_bit(seed: int) -> None:
    rng = random.Random(seed)
    resources = [f"r{j}" for j in range(rng.randint(1, 12))]
    caps = {r: rng.choice([1.0, 3.0, 7.0, 1e6, 125e6, rng.uniform(1.0, 1e9)]) for r in resources}
    paths = [
        rng.sample(resources, rng.randint(0, min(4, len(resources))))
        for _ in range(rng.randint(1, 40))
    ]
    fast = max_min_rates(paths, caps.__getitem__)
    ref = reference_max_min_rates(paths, caps.__getitem__)
    assert [x.hex() for x in fast] == [x.hex() for x in ref]


@pytest.mark.parametrize("seed", range(50))
def test_rates_do_not_depend_on_the_flows_order_and_one_path_gets_one_rate(seed: int) -> None:
    rng = random.Random(seed)
    resources = [f"r{j}" for j in range(rng.randint(2, 8))]
    caps = {r: rng.uniform(1.0, 1e9) for r in resources}
    distinct = [rng.sample(resources, rng.randint(1, min(3, len(resources)))) for _ in range(6)]
    paths = [rng.choice(distinct) for _ in range(rng.randint(2, 30))]
    rates = max_min_rates(paths, caps.__getitem__)
    order = list(range(len(paths)))
    rng.shuffle(order)
    shuffled = max_min_rates([paths[i] for i in order], caps.__getitem__)
    assert [rates[i].hex() for i in order] == [x.hex() for x in shuffled]
    by_path: dict[tuple[str, ...], float] = {}
    for path, rate in zip(paths, rates, strict=True):
        assert by_path.setdefault(tuple(path), rate) == rate
