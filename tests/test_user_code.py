"""The user's own model, data, loss, metric and optimizer (issue 14).

A user module (written to a temporary directory that becomes the working directory, as a
user's project would be) defines a model with BatchNorm, a map-style Dataset, a loss and a
metric; the tests pin what a user relies on: it trains on the sim, buffers follow each
strategy's stated rule, optimizer state survives a checkpoint resume, the saved model
reloads to the same accuracy, and every bad input gets its exit code and one line.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import dlion
from dlion.cli.commands import main
from dlion.core.config import ScheduleConfig, config_from_dict
from dlion.core.errors import ConfigError
from dlion.data.examples import DatasetExamples, TensorExamples
from dlion.engines.sim import run_sim
from dlion.training.model_io import load_model
from dlion.training.optim import schedule_factor

USER_MODULE = textwrap.dedent(
    '''
    import math
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    READS = []  # indices read through __getitem__, to check batches are read by index

    class Blobs(Dataset):
        """Four Gaussian blobs in 6 dimensions; targets as torchvision datasets have them."""
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.targets = torch.randint(0, 4, (n,), generator=g).tolist()
            centres = torch.randn(4, 6, generator=torch.Generator().manual_seed(99)) * 3
            noise = torch.randn(n, 6, generator=g)
            self.x = centres[torch.tensor(self.targets)] + noise
        def __len__(self):
            return len(self.targets)
        def __getitem__(self, i):
            READS.append(i)
            return self.x[i], self.targets[i]

    def blobs(n_train=400, n_test=100):
        return Blobs(n_train, 1), Blobs(n_test, 2)

    class FloatLabels(Blobs):
        def __getitem__(self, i):
            return self.x[i], float(self.targets[i]) + 0.5

    def float_labels():
        a, b = FloatLabels(40, 1), FloatLabels(20, 2)
        a.targets = [t + 0.5 for t in a.targets]
        return a, b

    def bn_net(input_shape, num_classes, width=16):
        return nn.Sequential(
            nn.Linear(input_shape[0], width), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, num_classes),
        )

    def not_a_module(num_classes):
        return "a string"

    def broken(num_classes):
        raise RuntimeError("out of coffee")

    def nan_loss(outputs, targets):
        return outputs.sum() * float("nan")

    def error_rate(outputs, targets):
        return float((outputs.argmax(-1) != targets).float().mean())
    '''
)


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("usermod", None)
    yield tmp_path
    sys.modules.pop("usermod", None)


def user_config(strategy: str = "allreduce", **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "user",
        "cluster": {
            "sites": [{"name": "a"}, {"name": "b"}],
            "workers": [
                {"site": "a", "capacity_gflops": 0.02, "count": 2},
                {"site": "b", "capacity_gflops": 0.01},
            ],
        },
        "data": {"name": "usermod:blobs"},
        "model": {"name": "usermod:bn_net", "options": {"width": 8}},
        "strategy": {"name": strategy},
        "train": {"max_time": 2.0, "batch_per_worker": 16, "lr": 0.05, "target_acc": 0.99},
        "evaluation": {"every_s": 0.5},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def bn_buffers(replica: Any) -> torch.Tensor:
    return replica.buffers.clone()


# ------------------------------------------------------------------------ training


def test_a_user_model_with_batchnorm_trains_and_its_buffers_are_all_reduced(
    user_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlion.training.replica import Replica

    seen: dict[int, list[torch.Tensor]] = {}  # update count -> each replica's buffers
    original = Replica.apply

    def recording_apply(self: Replica, grad: torch.Tensor) -> None:
        seen.setdefault(self.updates, []).append(self.buffers.clone())
        original(self, grad)

    monkeypatch.setattr(Replica, "apply", recording_apply)
    cfg = config_from_dict(user_config("allreduce"))
    result = run_sim(cfg, out_dir=user_dir / "run", progress=False)
    assert result.points[-1].mean_acc > 0.8  # four separable blobs
    first = result.replicas[0]
    assert first.buffers.numel() == 16  # running mean and var of 8 features
    assert not torch.equal(first.buffers[8:], torch.ones(8))  # statistics were collected
    # All-reduce averages buffers with the gradients: at every update, all three replicas
    # hold the same buffers (between updates each forward pass moves its own).
    complete = [buffers for buffers in seen.values() if len(buffers) == 3]
    assert len(complete) > 5
    for buffers in complete:
        assert all(torch.equal(b, buffers[0]) for b in buffers)
    # The BatchNorm module itself reads the flat buffer vector (views).
    bn = first.model[1]
    assert torch.equal(bn.running_mean, first.buffers[:8])


def test_gradient_exchange_keeps_buffers_local_and_dkt_merges_them(user_dir: Path) -> None:
    cfg = config_from_dict(user_config("gaia"))
    replicas = run_sim(cfg, progress=False).replicas
    assert not torch.equal(replicas[0].buffers, replicas[2].buffers)  # own batches' statistics


def test_dkt_merges_parameters_and_buffers_with_gamma(user_dir: Path) -> None:
    from dlion.strategies.dlion_hpdc21 import dkt_merge

    cfg = config_from_dict(user_config("dlion"))
    replica = run_sim(cfg, progress=False).replicas[0]
    before = replica.model_state()
    best = torch.randn(replica.model_numel)
    replica.set_model_state(dkt_merge(replica.model_state(), best, 0.5))
    assert torch.allclose(
        replica.buffers, 0.5 * before[replica.numel :] + 0.5 * best[replica.numel :]
    )
    assert torch.allclose(replica.flat, 0.5 * before[: replica.numel] + 0.5 * best[: replica.numel])


def test_model_state_layout_is_parameters_then_float_buffers(user_dir: Path) -> None:
    cfg = config_from_dict(user_config())
    replica = run_sim(cfg, progress=False).replicas[1]
    state = replica.model_state()
    assert state.numel() == replica.model_numel == replica.numel + replica.buffers.numel()
    assert replica.state_numel == replica.model_numel + replica.numel  # SGD: one momentum buffer
    vector = replica.state_vector()
    clone = run_sim(cfg, progress=False).replicas[2]
    clone.load_state_vector(vector)
    assert torch.equal(clone.model_state(), state)
    with pytest.raises(ValueError, match="entries"):
        clone.load_state_vector(vector[:-1])


def test_adamw_with_a_cosine_schedule_trains_and_survives_a_resume(user_dir: Path) -> None:
    raw = user_config(
        "dlion",
        train={
            "optimizer": {"name": "adamw", "options": {"betas": [0.9, 0.99]}},
            "lr": 0.01,
            "schedule": {"name": "cosine", "warmup_steps": 3, "total_steps": 40},
            "max_time": 3.0,
        },
        checkpoint={"every_s": 1.0},
    )
    cfg = config_from_dict(raw)
    whole = run_sim(cfg, out_dir=user_dir / "whole", progress=False)
    # Adam's state is in the checkpoint: a run stopped and resumed ends bit for bit the same.
    run_sim(cfg, out_dir=user_dir / "part", progress=False, stop_at=1.5)
    resumed = run_sim(cfg, out_dir=user_dir / "part", progress=False, resume=True)
    assert [p.mean_acc for p in resumed.points] == [p.mean_acc for p in whole.points]
    for a, b in zip(whole.replicas, resumed.replicas, strict=True):
        assert torch.equal(a.model_state(), b.model_state())
        assert torch.equal(a.state_vector(), b.state_vector())
    replica = whole.replicas[0]
    assert isinstance(replica.optimizer, torch.optim.AdamW)
    assert replica.updates > 3
    factor = schedule_factor(cfg.train.schedule, None)(replica.updates)
    assert replica.lr == pytest.approx(0.01 * factor)


def test_a_user_optimizer_from_torch_is_accepted(user_dir: Path) -> None:
    cfg = config_from_dict(user_config(train={"optimizer": {"name": "torch.optim:RAdam"}}))
    replica = run_sim(cfg, progress=False).replicas[0]
    assert isinstance(replica.optimizer, torch.optim.RAdam)


def test_optimizer_shorthand_and_schedule_factors() -> None:
    raw = user_config(train={"optimizer": "adamw"})
    assert config_from_dict(raw).train.optimizer.name == "adamw"
    warm = schedule_factor(ScheduleConfig(name="constant", warmup_steps=3), None)
    assert [warm(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    step = schedule_factor(ScheduleConfig(name="step", step_size=2, gamma=0.5), None)
    assert [step(s) for s in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    cosine = schedule_factor(ScheduleConfig(name="cosine", min_factor=0.1), 10)
    assert (
        cosine(0) == 1.0 and cosine(10) == pytest.approx(0.1) and cosine(20) == pytest.approx(0.1)
    )
    assert cosine(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    with pytest.raises(ConfigError, match="total_steps"):
        schedule_factor(ScheduleConfig(name="cosine"), None)


# ------------------------------------------------------------------------ data


def test_batches_are_read_by_index_never_the_whole_set(user_dir: Path) -> None:
    cfg = config_from_dict(user_config(train={"max_time": 0.5}, evaluation={"batch_size": 32}))
    import usermod  # the module the run imported from the working directory

    usermod.READS.clear()
    result = run_sim(cfg, progress=False)
    iterations = result.summary["iterations"]
    evaluations = len(result.points)
    # Each training read is one batch of 16 per worker; evaluation reads the 100 test
    # samples per distinct replica state. A copy of the dataset per replica would read all
    # 400 training samples up front.
    assert len(usermod.READS) <= 3 * 16 * (iterations + 1) + 3 * 100 * evaluations + 4 + 2
    assert usermod.READS.count(0) < 20


def test_minibatch_evaluation_equals_whole_set_evaluation(user_dir: Path) -> None:
    cfg = config_from_dict(user_config())
    replica = run_sim(cfg, progress=False).replicas[0]
    x = torch.randn(70, 6)
    y = torch.randint(0, 4, (70,))
    whole = replica.evaluate(TensorExamples(x, y), batch_size=1000)
    pieces = replica.evaluate(TensorExamples(x, y), batch_size=16)
    assert pieces[0] == pytest.approx(whole[0], abs=1e-6)
    assert pieces[1] == pytest.approx(whole[1], rel=1e-5)


def test_dataset_examples_collate_items(user_dir: Path) -> None:
    import usermod

    train, _ = usermod.blobs(10, 5)
    x, y = DatasetExamples(train, "t").batch(torch.tensor([3, 1]))
    assert x.shape == (2, 6) and y.tolist() == [train.targets[3], train.targets[1]]


# ------------------------------------------------------------------------ metric direction


def test_a_lower_is_better_metric_reaches_its_target_from_above(user_dir: Path) -> None:
    raw = user_config(
        evaluation={"metric": "usermod:error_rate", "higher_is_better": False},
        train={"target_acc": 0.3, "stop_at_target": True, "max_time": 3.0},
    )
    result = run_sim(config_from_dict(raw), progress=False)
    s = result.summary
    assert s["metric"] == "usermod:error_rate" and s["higher_is_better"] is False
    assert s["tta_s"] is not None
    assert result.points[0].mean_acc > 0.3 >= result.points[-1].mean_acc
    # The worst replica has the highest error.
    assert all(p.min_acc >= p.mean_acc - 1e-12 for p in result.points)


# ------------------------------------------------------------------------ the trained model


def test_the_saved_model_reloads_and_reevaluates_to_the_summary(
    user_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = user_dir / "run"
    (user_dir / "cfg.yaml").write_text(json.dumps(user_config("dlion")))
    assert main(["train", str(user_dir / "cfg.yaml"), "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    saved = summary["saved_model"]
    assert saved["file"] == "model.safetensors" and saved["replica"].startswith("best (rank ")
    model = load_model(out)
    assert isinstance(model, torch.nn.Sequential)
    assert set(model.state_dict()) >= {"1.running_mean", "1.running_var", "0.weight"}
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    line = capsys.readouterr().out
    assert "matches summary.json" in line
    # The best replica is the one with the best final accuracy.
    assert saved["metric"] == pytest.approx(max(saved["metric"], summary["final_min_acc"]))


def test_the_average_replica_can_be_saved(user_dir: Path) -> None:
    out = user_dir / "avg"
    raw = user_config("gaia", output={"save_model": "average"})
    result = run_sim(config_from_dict(raw), out_dir=out, progress=False)
    assert result.summary["saved_model"]["replica"] == "average of ranks [0, 1, 2]"
    model = load_model(out)
    mean = torch.stack([r.model_state() for r in result.replicas]).mean(0)
    n = result.replicas[0].numel
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(got, mean[:n])


def test_python_api_runs_a_dict_config_and_returns_the_model(user_dir: Path) -> None:
    out = dlion.run(user_config("allreduce"), ["train.seed=1"])
    assert out.summary["seed"] == 1 and out.points
    assert isinstance(out.model, torch.nn.Module)
    assert out.out_dir is None  # a temporary directory, removed


def test_register_strategy_and_plugins_are_listed(
    user_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (user_dir / "myplugin.py").write_text(
        textwrap.dedent(
            '''
            import dlion

            async def lazy(ctx, options):
                """trains alone, never talks"""
                while True:
                    result = await ctx.compute(16)
                    ctx.replica.apply(result.grad)
                    ctx.iteration_done(result.loss)

            dlion.register_strategy("lazy", lazy)
            '''
        )
    )
    monkeypatch.setenv("DLION_PLUGINS", "myplugin")
    sys.modules.pop("myplugin", None)
    from dlion.strategies import REGISTRY

    try:
        assert main(["strategies"]) == 0
        assert "lazy         trains alone, never talks (plugin)" in capsys.readouterr().out
        result = run_sim(config_from_dict(user_config("lazy")), progress=False)
        assert result.summary["bytes_sent"] == 0
    finally:
        REGISTRY.pop("lazy", None)
        sys.modules.pop("myplugin", None)
    with pytest.raises(ConfigError, match="built-in"):
        dlion.register_strategy("dlion", lambda ctx, o: None)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ({"model": {"name": "nosuchmod:net"}}, None, "model.name: cannot import 'nosuchmod'"),
        ({"model": {"name": "usermod:missing"}}, None, "has no attribute 'missing'"),
        (
            {"model": {"name": "usermod:not_a_module", "options": {}}},
            None,
            "expected a torch.nn.Module",
        ),
        (
            {"model": {"name": "usermod:broken", "options": {}}},
            None,
            "raised RuntimeError: out of coffee",
        ),
        ({"model": {"name": "resnet"}}, None, "unknown model 'resnet'"),
        ({"data": {"name": "usermod:float_labels"}}, None, "labels must be integers"),
        ({"train": {"optimizer": "adam"}}, None, "unknown optimizer 'adam'"),
        (
            {"train": {"optimizer": {"name": "sgd", "options": {"betas": 1}}}},
            None,
            "train.optimizer.options",
        ),
        ({"train": {"loss": "usermod:nope"}}, None, "train.loss"),
    ],
)
def test_bad_user_code_is_exit_2_with_one_line(
    user_dir: Path,
    capsys: pytest.CaptureFixture[str],
    section: dict[str, Any],
    value: Any,
    message: str,
) -> None:
    raw = user_config(**section)
    (user_dir / "bad.yaml").write_text(json.dumps(raw))
    out = user_dir / "out"
    assert main(["train", str(user_dir / "bad.yaml"), "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (out / "summary.json").exists()


def test_a_nan_loss_is_a_runtime_failure_with_one_line(
    user_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (user_dir / "nan.yaml").write_text(
        json.dumps(user_config(train={"loss": "usermod:nan_loss"}, evaluation={"metric": "loss"}))
    )
    assert main(["train", str(user_dir / "nan.yaml"), "--quiet", "--out", str(user_dir / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        "train.loss: the loss function returned nan on the first batch" in err
        and len(err.splitlines()) == 1
    )


def test_a_bad_model_file_is_refused(user_dir: Path) -> None:
    (user_dir / "run").mkdir()
    (user_dir / "run" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(dlion.training.model_io.ModelFileError, match="not a readable safetensors"):
        load_model(user_dir / "run")
    with pytest.raises(dlion.training.model_io.ModelFileError, match="no model file"):
        load_model(user_dir)


def test_a_user_model_with_batchnorm_trains_on_the_dist_engine(user_dir: Path) -> None:
    from dlion.engines.launcher import run_dist

    raw = user_config(
        "dlion",
        train={"max_time": 20.0, "target_acc": 0.9},
        engine={"name": "dist", "peer_timeout": 5.0, "heartbeat_s": 0.2},
    )
    result = run_dist(config_from_dict(raw), out_dir=user_dir / "dist", progress=False)
    s = result.summary
    assert s["tta_s"] is not None and s["final_acc"] >= 0.9
    model = load_model(user_dir / "dist")  # the workers imported usermod from the cwd too
    assert "1.running_mean" in model.state_dict()
    assert not torch.equal(model.state_dict()["1.running_var"], torch.ones(8))
