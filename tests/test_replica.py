"""The flat-parameter replica: views, SGD semantics, batching, evaluation."""

from __future__ import annotations

import torch

from dlion.training.models import build_model
from dlion.training.replica import Replica


def _replica(seed: int = 0, n: int = 50) -> Replica:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    model = build_model("mlp", (6,), 3, hidden=[8], seed=seed)
    return Replica.from_tensors(model, x, y, lr=0.1, momentum=0.9, weight_decay=0.01, seed=seed)


def test_parameters_are_views_of_the_flat_vector() -> None:
    rep = _replica()
    rep.set_params(torch.zeros(rep.numel))
    assert all(bool((p == 0).all()) for p in rep.model.parameters())
    assert rep.numel == sum(p.numel() for p in rep.model.parameters())


def test_apply_matches_torch_sgd_with_momentum_and_weight_decay() -> None:
    rep = _replica()
    reference = build_model("mlp", (6,), 3, hidden=[8], seed=0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(rep.numel, generator=gen)
        rep.apply(grad)
        offset = 0
        for p in reference.parameters():
            p.grad = grad[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert torch.allclose(rep.flat, expected, atol=1e-6)


def test_batches_walk_the_whole_shard_each_epoch() -> None:
    rep = _replica(n=10)
    seen = torch.cat([rep._next_indices(3) for _ in range(10)])  # 30 = three epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 10 : (epoch + 1) * 10].tolist()) == list(range(10))


def test_gradient_is_deterministic_per_seed_and_leaves_no_grads() -> None:
    a, b = _replica(seed=3), _replica(seed=3)
    ga, la = a.gradient(8)
    gb, lb = b.gradient(8)
    assert torch.equal(ga, gb) and la == lb
    assert all(p.grad is None for p in a.model.parameters())


def test_evaluate_reports_accuracy_in_unit_interval() -> None:
    rep = _replica()
    acc, loss = rep.evaluate(rep.x, rep.y)
    assert 0.0 <= acc <= 1.0 and loss > 0
