"""LMC: barrier/AUC on curves with known answers; curves of one pair and of many; BN reset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import deepalign as da
from deepalign.errors import DeepAlignError
from deepalign.lmc import (
    auc,
    barrier,
    evaluate,
    interpolate,
    lmc_curve,
    lmc_curves,
    reset_bn_stats,
)


def test_parabola_bump_over_a_sloped_chord():
    lam = torch.linspace(0, 1, 101, dtype=torch.float64)
    h, l0, l1 = 0.8, 2.0, 1.0
    loss = l0 * (1 - lam) + l1 * lam + 4 * h * lam * (1 - lam)
    assert barrier(lam, loss) == pytest.approx(h, abs=1e-9)  # peak at lam = 0.5
    assert auc(lam, loss) == pytest.approx(2 * h / 3, abs=1e-3)  # integral of 4h lam (1 - lam)


def test_curve_below_its_chord_has_zero_barrier_and_auc():
    lam = torch.linspace(0, 1, 11)
    loss = 1.0 - 0.5 * torch.sin(math.pi * lam)
    assert barrier(lam, loss) == 0.0 and auc(lam, loss) == 0.0


def test_auc_is_clipped_after_integration():
    # above the chord on the first half, equally far below on the second: barrier > 0, AUC 0
    lam = torch.linspace(0, 1, 201)
    loss = 0.3 * torch.sin(2 * math.pi * lam)
    assert barrier(lam, loss) == pytest.approx(0.3, abs=1e-6)
    assert auc(lam, loss) == 0.0


def test_accuracy_barrier_and_batched_curves():
    lam = torch.linspace(0, 1, 5)
    acc = torch.tensor([[0.9, 0.7, 0.5, 0.7, 0.9], [0.9, 0.9, 0.9, 0.9, 0.9]])
    got = barrier(lam, acc, higher_is_better=True)
    assert isinstance(got, torch.Tensor) and got.shape == (2,)
    assert got.tolist() == pytest.approx([0.4, 0.0])
    assert auc(lam, acc, higher_is_better=True)[1] == 0.0


def test_bad_curves_are_rejected():
    with pytest.raises(DeepAlignError):
        barrier([0.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(DeepAlignError):
        auc([0.0, 0.5, 1.0], [1.0, float("nan"), 1.0])


def _nets(n: int, seed: int = 0, norm: str | None = None):
    torch.manual_seed(seed)
    return [da.mlp([64, 16, 10], norm=norm, flatten_input=True) for _ in range(n)]


def _data(n: int = 150, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_interpolate_ends_and_midpoint():
    m1, m2 = _nets(2)
    a, b = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(interpolate(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.allclose(interpolate(a, b, 1.0)[k], b[k]) for k in a)
    mid = interpolate(a, b, 0.25)
    assert all(torch.allclose(mid[k], 0.75 * a[k] + 0.25 * b[k]) for k in a)


def test_curve_ends_are_the_two_networks():
    m1, m2 = _nets(2, seed=1)
    x, y = _data()
    c = lmc_curve(m1, m1.state_dict(), m2.state_dict(), (x, y), points=5, batch_size=64)
    with torch.no_grad():
        for net, i in ((m1, 0), (m2, -1)):
            out = net.eval()(x)
            assert float(c["loss"][i]) == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
            assert float(c["accuracy"][i]) == pytest.approx(
                float((out.argmax(1) == y).float().mean())
            )
    assert c["lambdas"].tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert c["barrier"] == pytest.approx(barrier(c["lambdas"], c["loss"]))


def test_batched_curves_match_one_by_one():
    nets = _nets(6, seed=2)
    x, y = _data(seed=3)
    a_list, b_list = [n.state_dict() for n in nets[:3]], [n.state_dict() for n in nets[3:]]
    stack = lambda ss: {k: torch.stack([s[k] for s in ss]) for k in ss[0]}  # noqa: E731
    many = lmc_curves(
        nets[0], stack(a_list), stack(b_list), (x, y), points=4, batch_size=64, chunk=2
    )
    assert many["loss"].shape == (3, 4) and many["barrier"].shape == (3,)
    for i in range(3):
        one = lmc_curve(nets[0], a_list[i], b_list[i], (x, y), points=4, batch_size=64)
        torch.testing.assert_close(many["loss"][i], one["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(many["accuracy"][i], one["accuracy"])


def test_custom_loss_for_regression_targets():
    """INR style: the target moves with lam too, so both ends fit exactly and the middle may not."""
    torch.manual_seed(4)
    net_a, net_b = da.mlp([2, 8, 1]), da.mlp([2, 8, 1])
    coords = torch.rand(50, 2)
    with torch.no_grad():
        ta, tb = net_a(coords), net_b(coords)
    targets = torch.cat([ta, tb], dim=1)

    def mse(out, y, lam):
        return F.mse_loss(out, (1 - lam) * y[:, :1] + lam * y[:, 1:])

    c = lmc_curve(net_a, net_a.state_dict(), net_b.state_dict(), (coords, targets), 5, loss_fn=mse)
    assert c["accuracy"] is None
    assert float(c["loss"][0]) < 1e-12 and float(c["loss"][-1]) < 1e-12
    assert float(c["loss"][2]) > 0


def test_bn_reset_recomputes_statistics_on_the_given_data():
    (net,) = _nets(1, seed=5, norm="batchnorm")
    x, _ = _data(seed=6)
    net.eval()
    bn = net[2]
    with torch.no_grad():
        pre = net[1](net[0](x))
    reset_bn_stats(net, x, batch_size=len(x))  # one batch: exactly its mean and unbiased variance
    torch.testing.assert_close(bn.running_mean, pre.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, pre.var(0), rtol=1e-3, atol=1e-5)
    reset_bn_stats(net, x, batch_size=50)  # equal batches: the plain average of batch statistics
    parts = pre.view(3, 50, -1)
    torch.testing.assert_close(bn.running_mean, parts.mean(1).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, parts.var(1).mean(0), rtol=1e-3, atol=1e-5)
    assert not net.training and bn.momentum == 0.1


def test_bn_reset_changes_the_curve_of_batchnorm_nets():
    m1, m2 = _nets(2, seed=7, norm="batchnorm")
    x, y = _data(seed=8)
    a, b = m1.state_dict(), m2.state_dict()
    plain = lmc_curve(m1, a, b, (x, y), points=3)
    reset = lmc_curve(m1, a, b, (x, y), points=3, bn_reset=x)
    assert not torch.allclose(plain["loss"], reset["loss"])
    net = da.mlp([64, 16, 10], norm="batchnorm", flatten_input=True)
    net.load_state_dict(interpolate(a, b, 0.5))
    reset_bn_stats(net, x)
    loss, _ = evaluate(net, (x, y))
    assert float(reset["loss"][1]) == pytest.approx(loss, rel=1e-5)


def test_batched_curves_with_bn_reset_match_one_by_one():
    nets = _nets(4, seed=9, norm="batchnorm")
    x, y = _data(seed=10)
    sa, sb = [n.state_dict() for n in nets[:2]], [n.state_dict() for n in nets[2:]]
    stack = lambda ss: {k: torch.stack([s[k] for s in ss]) for k in ss[0]}  # noqa: E731
    many = lmc_curves(nets[0], stack(sa), stack(sb), (x, y), points=3, bn_reset=x)
    for i in range(2):
        one = lmc_curve(nets[0], sa[i], sb[i], (x, y), points=3, bn_reset=x)
        torch.testing.assert_close(many["loss"][i], one["loss"])
