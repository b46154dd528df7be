"""Augmentations and Deep-Align's loss terms on hand-made cases."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import deepalign as da
from deepalign.core import permutation as P
from deepalign.core.functional import batched_forward, stack_states
from deepalign.training.augment import Augment, positive_scaling, quantile_prune, weight_dropout
from deepalign.training.losses import alignment_loss, lmc_loss, supervised_loss


def _stack(builder, n, seed=0):
    torch.manual_seed(seed)
    module = builder().eval()
    return (
        module,
        da.spec_for_module(module),
        stack_states([builder().state_dict() for _ in range(n)]),
    )


def test_positive_scaling_keeps_the_function():
    for builder, x in [
        (lambda: da.mlp([64, 12, 9, 10], flatten_input=True), torch.randn(5, 1, 8, 8)),
        (lambda: da.cnn(1, [4, 5], 10, 8), torch.randn(5, 1, 8, 8)),
    ]:
        module, spec, st = _stack(builder, 3)
        scaled = positive_scaling(st, spec, 0.5, torch.Generator().manual_seed(1))
        assert any(not torch.equal(scaled[k], st[k]) for k in st)
        torch.testing.assert_close(
            batched_forward(module, scaled, x), batched_forward(module, st, x), atol=1e-5, rtol=1e-4
        )


def test_augment_is_seeded():
    _, spec, st = _stack(lambda: da.mlp([64, 12, 9, 10], flatten_input=True), 2)
    a = Augment()(st, spec, torch.Generator().manual_seed(3))
    b = Augment()(st, spec, torch.Generator().manual_seed(3))
    c = Augment()(st, spec, torch.Generator().manual_seed(4))
    assert all(torch.equal(a[k], b[k]) for k in st)
    assert any(not torch.equal(a[k], c[k]) for k in st)


def test_dropout_and_pruning_rates():
    big = {"w": torch.randn(2, 300, 300)}
    g = torch.Generator().manual_seed(0)
    dropped = weight_dropout(big, 0.2, g)["w"]
    assert abs((dropped == 0).float().mean().item() - 0.2) < 0.01
    pruned = quantile_prune(big, 0.5, g)["w"]
    frac = (pruned == 0).float().flatten(1).mean(1)
    assert (frac <= 0.5 + 1e-3).all()
    assert torch.equal(quantile_prune(big, 0.0, g)["w"], big["w"])


def test_supervised_loss_is_lowest_at_the_planted_permutation():
    g = torch.Generator().manual_seed(0)
    target = {"P0": torch.argsort(torch.rand(4, 6, generator=g), dim=-1)}
    right = {"P0": 5 * P.to_matrices(target)["P0"]}
    wrong_perm = {"P0": target["P0"].roll(1, dims=-1)}
    wrong = {"P0": 5 * P.to_matrices(wrong_perm)["P0"]}
    assert supervised_loss(right, target) < supervised_loss(wrong, target)
    assert supervised_loss(right, target) < 0.1


def test_alignment_and_lmc_losses_vanish_or_match_at_the_right_permutation():
    module, spec, a = _stack(lambda: da.mlp([64, 12, 9, 10], flatten_input=True), 3)
    t = P.random_permutation(spec, seed=1, batch=3)
    b = P.apply(spec, t, a, batch_dims=1)
    right = P.to_matrices(P.invert(t))
    wrong = P.to_matrices(P.identity(spec))
    wrong = {k: v.expand(3, -1, -1) for k, v in wrong.items()}
    assert alignment_loss(spec, a, b, right) < 1e-10
    assert alignment_loss(spec, a, b, wrong) > 1e-3
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    expected = F.cross_entropy(batched_forward(module, a, x).reshape(-1, 10), y.repeat(3))
    got = lmc_loss(spec, module, a, b, right, x, y, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, expected)


def test_cosine_schedule_decays_from_lr_to_five_percent():
    import pytest

    from deepalign.errors import DeepAlignError
    from deepalign.training.loop import TrainConfig, learning_rate

    cfg = TrainConfig(lr=1e-2)
    rates = [learning_rate(cfg, t, 100) for t in range(101)]
    assert rates[0] == pytest.approx(1e-2) and rates[-1] == pytest.approx(5e-4)
    assert all(x >= y for x, y in zip(rates, rates[1:], strict=False))
    assert learning_rate(TrainConfig(lr=1e-2, schedule="constant"), 50, 100) == 1e-2
    with pytest.raises(DeepAlignError, match="schedule"):
        learning_rate(TrainConfig(schedule="step"), 0, 10)
