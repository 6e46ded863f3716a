"""Instance catalog: the shipped file, validation with one-line errors, revocation draws."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from dlion.core.errors import ConfigError
from dlion.transient.catalog import Revocation, load_catalog, shipped_catalogs
from dlion.transient.revocation import draw_lifetime_s


def test_shipped_catalog_cites_prices_and_revocations() -> None:
    assert "default" in shipped_catalogs()
    cat = load_catalog("default")
    assert {i.name for i in cat.instances} >= {"gcp-n1-4-k80", "aws-p2.xlarge"}
    for inst in cat.instances:
        for key in ("peak_gflops", "on_demand_per_h", "transient_per_h", "revocation"):
            assert inst.sources.get(key), f"{inst.name}: no source for {key}"
        assert inst.transient_per_h < inst.on_demand_per_h
    gcp = cat.get("gcp-n1-4-k80")
    assert gcp.revocation.max_lifetime_h == 24  # GCP preemptible VMs stop after 24 h
    assert gcp.capacity_gflops == pytest.approx(4370 * 0.05)


GOOD = """
name: mine
instances:
  - name: box
    peak_gflops: 100
    efficiency: 0.5
    on_demand_per_h: 1.0
    transient_per_h: 0.3
    startup_s: 60
    revocation: {distribution: exponential, mean_lifetime_h: 5}
"""


def test_user_catalog_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    cat = load_catalog(path)
    assert cat.get("box").price_per_h("transient") == 0.3
    assert cat.get("box").price_per_h("on-demand") == 1.0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("on_demand_per_h: 1.0", "on_demand_per_h: -1"), "instances.0.on_demand_per_h"),
        (("peak_gflops: 100", "peak_gflops: lots"), "instances.0.peak_gflops"),
        (("efficiency: 0.5", "efficiency: 2"), "instances.0.efficiency"),
        (("mean_lifetime_h: 5", "shape: 2"), "exponential: give mean_lifetime_h"),
        (("exponential", "gamma"), "instances.0.revocation.distribution"),
        (("startup_s: 60", "startup_s: 60\n    colour: red"), "instances.0.colour"),
        (("name: box", "name: box\n  - {}"), "line 6"),  # broken YAML names the line
        (("instances:", "instances: []\nx:"), "instances: List should have at least 1"),
    ],
)
def test_bad_catalog_one_line_naming_the_field(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(GOOD.replace(*change, 1))
    with pytest.raises(ConfigError) as err:
        load_catalog(path)
    message = str(err.value)
    assert "\n" not in message
    assert expected in message


def test_duplicate_type_and_unknown_sources(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    body = GOOD.split("instances:\n")[1]
    path.write_text(GOOD + body)
    with pytest.raises(ConfigError, match="duplicate instance type 'box'"):
        load_catalog(path)
    with pytest.raises(ConfigError, match="not a catalog file or a shipped catalog"):
        load_catalog("no-such-catalog")
    with pytest.raises(ConfigError, match="catalog file not found"):
        load_catalog(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown instance type 'gpu9000'"):
        load_catalog("default").get("gpu9000")


def test_lifetime_draws_follow_the_law() -> None:
    rng = random.Random(1)
    exp = Revocation(distribution="exponential", mean_lifetime_h=2.0)
    draws = [draw_lifetime_s(exp, rng) for _ in range(20000)]
    assert sum(draws) / len(draws) == pytest.approx(2 * 3600, rel=0.03)
    wb = Revocation(distribution="weibull", shape=0.8, scale_h=10.0)
    draws = [draw_lifetime_s(wb, rng) for _ in range(20000)]
    assert sum(draws) / len(draws) == pytest.approx(10 * 3600 * math.gamma(1 + 1 / 0.8), rel=0.04)
    capped = Revocation(distribution="weibull", shape=0.8, scale_h=10.0, max_lifetime_h=24)
    assert max(draw_lifetime_s(capped, rng) for _ in range(5000)) == 24 * 3600
    assert draw_lifetime_s(Revocation(distribution="none"), rng) == math.inf
