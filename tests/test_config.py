"""Tests for dlion.core.config: shipped presets, overrides, and one-line errors naming the field."""

from __future__ import annotations

import itertools
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlion.cluster.topology import Cluster
from dlion.core.config import (
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    shipped_scenarios,
    with_changes,
)
from dlion.core.errors import BadInput, ConfigError
from dlion.training.models import build_model, count_parameters, train_flops_per_sample

PRESETS = ("homogeneous", "microcloud-hetero")
HETERO = "microcloud-hetero"
DIGITS_SHAPE = (1, 8, 8)
DIGITS_CLASSES = 10


def _preset_raw(name: str) -> dict[str, Any]:
    text = (resources.files("dlion") / "scenarios" / f"{name}.yaml").read_text()
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict)
    return raw


# ----------------------------------------------------------------------------- presets


def test_shipped_scenarios_lists_both_presets() -> None:
    names = shipped_scenarios()
    assert set(PRESETS) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == name
    assert cfg.description
    # Round trip: the dumped config validates again to an equal config.
    assert config_from_dict(cfg.model_dump(mode="json")) == cfg
    cluster = Cluster.from_config(cfg.cluster)
    assert cluster.size == 6


def test_homogeneous_is_one_site_of_equal_workers() -> None:
    cluster = Cluster.from_config(load_config("homogeneous").cluster)
    assert cluster.sites() == ["site-a"]
    assert len({cluster.capacity(r) for r in range(cluster.size)}) == 1


def test_microcloud_hetero_layout() -> None:
    cfg = load_config(HETERO)
    cluster = Cluster.from_config(cfg.cluster)
    assert cluster.size == 6
    sites = cluster.sites()
    assert len(sites) == 3
    for site in sites:
        assert sum(w.site == site for w in cluster.workers) == 2

    caps = [cluster.capacity(r) for r in range(cluster.size)]
    slowest = min(caps)
    assert [c / slowest for c in caps] == pytest.approx([4, 4, 2, 2, 1, 1])

    intra = [
        cluster.link(a, b)
        for a, b in itertools.permutations(range(cluster.size), 2)
        if cluster.workers[a].site == cluster.workers[b].site
    ]
    inter = [
        cluster.link(a, b)
        for a, b in itertools.permutations(range(cluster.size), 2)
        if cluster.workers[a].site != cluster.workers[b].site
    ]
    assert intra and inter
    fastest_inter_bw = max(link.bandwidth for link in inter)
    lowest_inter_latency = min(link.latency for link in inter)
    for link in intra:
        assert link.bandwidth > fastest_inter_bw
        assert link.latency < lowest_inter_latency

    # Inter-site links are unequal: one distinct link per site pair, all different.
    by_pair: dict[frozenset[str], set[tuple[float, float]]] = {}
    for a, b in itertools.permutations(range(cluster.size), 2):
        sa, sb = cluster.workers[a].site, cluster.workers[b].site
        if sa != sb:
            link = cluster.link(a, b)
            by_pair.setdefault(frozenset((sa, sb)), set()).add((link.bandwidth, link.latency))
    assert len(by_pair) == 3
    assert all(len(v) == 1 for v in by_pair.values()), "a site pair has mixed links"
    assert len({next(iter(v)) for v in by_pair.values()}) == 3
    assert len({next(iter(v))[0] for v in by_pair.values()}) == 3, "bandwidths not unequal"


def test_microcloud_hetero_calibration_comm_is_2x_to_5x_compute() -> None:
    cfg = load_config(HETERO)
    assert cfg.model.name == "mlp"
    assert cfg.data.name == "digits"
    model = build_model(
        cfg.model.name, DIGITS_SHAPE, DIGITS_CLASSES, hidden=cfg.model.hidden, seed=0
    )
    params = count_parameters(model)
    flops = train_flops_per_sample(model, DIGITS_SHAPE)
    cluster = Cluster.from_config(cfg.cluster)

    grad_bytes = 4 * params + cfg.engine.header_bytes
    inter_times = [
        cluster.link(a, b).latency + grad_bytes / cluster.link(a, b).bandwidth
        for a, b in itertools.permutations(range(cluster.size), 2)
        if cluster.workers[a].site != cluster.workers[b].site
    ]
    comm = max(inter_times)
    slowest_capacity = min(cluster.capacity(r) for r in range(cluster.size))
    compute = flops * cfg.train.batch_per_worker / slowest_capacity
    ratio = comm / compute
    assert 2.0 <= ratio <= 5.0, f"comm {comm:.4f}s / compute {compute:.4f}s = {ratio:.2f}"


# ----------------------------------------------------------------------------- overrides


def test_override_int() -> None:
    cfg = load_config(HETERO, ["train.seed=3"])
    assert cfg.train.seed == 3
    assert type(cfg.train.seed) is int


def test_override_bool() -> None:
    cfg = load_config(HETERO, ["train.stop_at_target=false"])
    assert cfg.train.stop_at_target is False


def test_override_float_and_list() -> None:
    cfg = load_config(HETERO, ["train.lr=0.125", "model.hidden=[32,16]"])
    assert cfg.train.lr == 0.125
    assert cfg.model.hidden == [32, 16]


def test_override_creates_nested_dict() -> None:
    assert load_config(HETERO).strategy.options == {}
    cfg = load_config(HETERO, ["strategy.options.rho=0.5"])
    assert cfg.strategy.options == {"rho": 0.5}


def test_override_list_index() -> None:
    cfg = load_config(HETERO, ["cluster.workers.0.capacity_gflops=1.5"])
    assert cfg.cluster.workers[0].capacity_gflops == 1.5
    assert cfg.cluster.workers[1].capacity_gflops == 0.2  # the others are untouched


def test_override_last_one_wins_and_value_may_contain_equals() -> None:
    cfg = load_config(HETERO, ["train.seed=1", "train.seed=2", "description=a=b"])
    assert cfg.train.seed == 2
    assert cfg.description == "a=b"


def test_apply_overrides_does_not_mutate_input() -> None:
    raw = {"train": {"seed": 1}, "model": {"hidden": [1, 2]}}
    out = apply_overrides(raw, ["train.seed=5", "model.hidden.1=7"])
    assert out == {"train": {"seed": 5}, "model": {"hidden": [1, 7]}}
    assert raw == {"train": {"seed": 1}, "model": {"hidden": [1, 2]}}


def test_with_changes_revalidates_and_keeps_original() -> None:
    cfg = load_config(HETERO)
    changed = with_changes(cfg, ["train.seed=9"])
    assert changed.train.seed == 9
    assert cfg.train.seed == 0
    with pytest.raises(ConfigError, match=r"train\.lr"):
        with_changes(cfg, ["train.lr=0"])


def test_config_from_dict_names_origin() -> None:
    with pytest.raises(ConfigError, match=r"^my-origin: cluster"):
        config_from_dict({}, "my-origin")


def test_config_error_is_bad_input() -> None:
    assert issubclass(ConfigError, BadInput)


# ----------------------------------------------------------------------------- bad inputs

GOOD_CLUSTER = "cluster:\n  sites: [{name: a}]\n  workers: [{site: a, capacity_gflops: 1}]\n"

# (kind, payload, overrides, fragments the message must contain). kind: "preset" loads
# `payload` by name; "file" writes payload to tmp_path/cfg.yaml; "path" uses
# tmp_path/payload as given. "{path}" in a fragment stands for the config's path.
BAD_CASES: list[tuple[str, str, list[str], list[str]]] = [
    ("preset", HETERO, ["bogus=1"], ["bogus", "Extra inputs"]),
    # Strategy options are checked when the config loads, through the registry.
    (
        "preset",
        HETERO,
        ["strategy.options.wbd=false"],
        ["strategy.options.wbd", "(strategy dlion)"],
    ),
    (
        "preset",
        HETERO,
        ["strategy.name=gaia", "strategy.options={}", "strategy.options.threshold=-1"],
        ["strategy.options.threshold"],
    ),
    ("preset", HETERO, ["strategy.name=nope"], ["strategy.name", "unknown strategy 'nope'"]),
    ("preset", HETERO, ["train.bogus=1"], ["train.bogus"]),
    ("preset", HETERO, ["train.seed=abc"], ["train.seed", "integer"]),
    ("preset", HETERO, ["train.seed=1.5"], ["train.seed"]),
    ("preset", HETERO, ["train.lr=-1"], ["train.lr", "greater than 0"]),
    ("preset", HETERO, ["train.target_acc=1.5"], ["train.target_acc"]),
    ("preset", HETERO, ["data.test_fraction=0"], ["data.test_fraction"]),
    ("preset", HETERO, ["data.name=imagenet"], ["data.name", "imagenet"]),
    ("preset", HETERO, ["model.name=resnet"], ["model.name", "resnet"]),
    ("preset", HETERO, ["model.hidden=[a]"], ["model.hidden.0"]),
    ("preset", HETERO, ["model.hidden=[]"], ["model.hidden"]),
    ("preset", HETERO, ["cluster.workers.0.site=nowhere"], ["cluster.workers.0.site", "nowhere"]),
    ("preset", HETERO, ["cluster.workers.2.count=0"], ["cluster.workers.2.count"]),
    ("preset", HETERO, ["cluster.links.0.sites=[site-a, mars]"], ["cluster.links.0.sites", "mars"]),
    ("preset", HETERO, ["cluster.links.1.workers=[0, 1]"], ["cluster.links.1", "sites"]),
    ("preset", HETERO, ["cluster.links.2.latency_ms=-1"], ["cluster.links.2.latency_ms"]),
    ("preset", HETERO, ["cluster.sites.1.name=site-a"], ["cluster.sites", "unique"]),
    ("preset", HETERO, ["cluster.workers=[]"], ["cluster.workers"]),
    ("preset", HETERO, ["train=3"], ["train"]),
    ("preset", HETERO, ["train.seed"], ["train.seed", "KEY=VALUE"]),
    ("preset", HETERO, ["=1"], ["--set", "empty key"]),
    ("preset", HETERO, ["train.lr.x=1"], ["train.lr", "not a section"]),
    ("preset", HETERO, ["cluster.workers.9.capacity_gflops=1"], ["cluster.workers.9"]),
    ("preset", HETERO, ["cluster.workers.x.capacity_gflops=1"], ["cluster.workers.x"]),
    ("preset", HETERO, ["model.hidden.5=3"], ["model.hidden.5", "list index"]),
    ("preset", "no-such-scenario", [], ["no-such-scenario", HETERO]),
    ("file", "[]\n", [], ["{path}", "mapping"]),
    ("file", "- a\n- b\n", [], ["{path}", "mapping"]),
    ("file", "train: [\n", [], ["{path}", "line"]),
    ("file", "train:\n  seed: 1\n\tlr: 2\n", [], ["{path}", "line"]),
    ("file", "", [], ["{path}", "cluster"]),
    ("file", GOOD_CLUSTER + "trian: {seed: 1}\n", [], ["{path}", "trian"]),
    ("file", GOOD_CLUSTER + "train: {seed: 1, bogus: 2}\n", [], ["train.bogus"]),
    ("file", GOOD_CLUSTER.replace("site: a", "site: b"), [], ["cluster.workers.0.site"]),
    ("file", GOOD_CLUSTER + "  wrokers: []\n", [], ["cluster.wrokers"]),
    ("path", "missing.yaml", [], ["{path}", "not found"]),
    ("path", "missing-dir/cfg.yml", [], ["{path}", "not found"]),
    ("path", "a-directory", [], ["{path}"]),
]


def _source(tmp_path: Path, kind: str, payload: str) -> str:
    if kind == "preset":
        return payload
    if kind == "file":
        path = tmp_path / "cfg.yaml"
        path.write_text(payload)
        return str(path)
    assert kind == "path"
    if payload == "a-directory":
        (tmp_path / payload).mkdir()
    return str(tmp_path / payload)


@pytest.mark.parametrize(
    ("kind", "payload", "overrides", "fragments"),
    BAD_CASES,
    ids=[f"{i}-{c[2][0] if c[2] else c[1][:20]!r}" for i, c in enumerate(BAD_CASES)],
)
def test_bad_config_raises_config_error_naming_field(
    tmp_path: Path, kind: str, payload: str, overrides: list[str], fragments: list[str]
) -> None:
    source = _source(tmp_path, kind, payload)
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment.replace("{path}", source) in message, message


def test_override_through_list_element_scalar_is_config_error() -> None:
    # model.hidden.0 is the int 128; descending further must be a ConfigError, not TypeError.
    with pytest.raises(ConfigError, match=r"model\.hidden\.0"):
        load_config(HETERO, ["model.hidden.0.x=1"])


def test_deep_override_through_list_element_scalar_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden\.0"):
        load_config(HETERO, ["model.hidden.0.x.y=1"])


def test_non_utf8_config_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"name: x\n\xff\xfe: 1\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(str(path))


# ----------------------------------------------------------------------------- properties

KNOWN_PATHS = [
    "name",
    "description",
    "cluster",
    "cluster.sites",
    "cluster.sites.0",
    "cluster.sites.0.name",
    "cluster.sites.2.intra_bandwidth_mbps",
    "cluster.sites.1.intra_latency_ms",
    "cluster.workers",
    "cluster.workers.0",
    "cluster.workers.0.site",
    "cluster.workers.1.capacity_gflops",
    "cluster.workers.2.nic_mbps",
    "cluster.workers.2.count",
    "cluster.links",
    "cluster.links.0.sites",
    "cluster.links.1.workers",
    "cluster.links.2.bandwidth_mbps",
    "cluster.links.0.latency_ms",
    "cluster.default_inter_bandwidth_mbps",
    "data",
    "data.name",
    "data.path",
    "data.test_fraction",
    "data.num_samples",
    "data.partition",
    "data.alpha",
    "model",
    "model.name",
    "model.hidden",
    "model.hidden.0",
    "model.channels",
    "strategy",
    "strategy.name",
    "strategy.options",
    "strategy.options.rho",
    "train",
    "train.seed",
    "train.target_acc",
    "train.max_time",
    "train.stop_at_target",
    "train.batch_per_worker",
    "train.lr",
    "train.momentum",
    "train.max_iterations",
    "engine.name",
    "engine.header_bytes",
    "evaluation.every_s",
    "evaluation.max_test_samples",
]

FAST = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _load_or_config_error(source: str, overrides: list[str] | None = None) -> None:
    try:
        cfg = load_config(source, overrides)
    except ConfigError as err:
        assert str(err), "empty ConfigError message"
        assert "\n" not in str(err)
    else:
        assert isinstance(cfg, ExperimentConfig)


@FAST
@given(path=st.sampled_from(KNOWN_PATHS), value=st.text(max_size=30))
def test_property_text_value_for_known_field(path: str, value: str) -> None:
    _load_or_config_error(HETERO, [f"{path}={value}"])


@FAST
@given(overrides=st.lists(st.text(max_size=40), max_size=3))
def test_property_garbage_override_strings(overrides: list[str]) -> None:
    _load_or_config_error(HETERO, overrides)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=8,
)


@FAST
@given(path=st.sampled_from(KNOWN_PATHS), value=_values)
def test_property_yaml_document_with_random_field(tmp_path: Path, path: str, value: Any) -> None:
    raw = apply_overrides(_preset_raw(HETERO), [f"{path}=null"])
    # Put the random value at `path` (apply_overrides set it, so every step exists).
    node: Any = raw
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    doc = tmp_path / "doc.yaml"
    doc.write_text(yaml.safe_dump(raw, allow_unicode=True))
    _load_or_config_error(str(doc))


@FAST
@given(text=st.text(max_size=200))
def test_property_random_text_document(tmp_path: Path, text: str) -> None:
    doc = tmp_path / "doc.yaml"
    doc.write_text(text, encoding="utf-8")
    _load_or_config_error(str(doc))
