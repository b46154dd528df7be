"""The siamese Deep-Align model: Prop. 3 (equivariance, swap), Prop. 5 (exactness), conventions."""

from __future__ import annotations

import pytest
import torch

from deepalign.core import arch
from deepalign.core.permutation import apply, apply_soft, invert, is_permutation, random_permutation
from deepalign.errors import DeepAlignError
from deepalign.nn.model import DeepAlign, DeepAlignConfig
from deepalign.nn.weight_space import WeightSpaceLayout
from deepalign.solvers.assignment import linear_assignment

torch.set_num_threads(1)


def random_stack(module, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    return {k: torch.randn(n, *v.shape, generator=g) for k, v in sd.items()}


SMALL = dict(hidden=16, edge_channels=8, out_features=16, n_layers=2, n_heads=2)
NETS = {
    "mlp": lambda: arch.mlp([6, 5, 7, 4, 3]),
    "cnn": lambda: arch.cnn(3, [4, 5], 10, image_size=8),
    "siren": lambda: arch.siren([1, 6, 5, 1]),  # one input and one output: size-1 axes
}


def setup(name, batch=3, seed=0, **cfg):
    module = NETS[name]()
    layout = WeightSpaceLayout.from_module(module)
    torch.manual_seed(seed)  # the model's initial weights
    model = DeepAlign(layout, DeepAlignConfig(**{**SMALL, **cfg}))
    return layout, model, random_stack(module, batch, seed=seed)


def gather_scores(q, g, gp):
    """``(P_g Q P_g'^T)[b, i, j] = Q[b, g[b, i], g'[b, j]]``, written out with explicit indexing."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        out[b] = q[b][g[b]][:, gp[b]]
    return out


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("train_mode", [False, True])
def test_scores_are_equivariant_and_swap_symmetric(name, train_mode):
    """Prop. 3: F(g#v, g'#v') = g F(v, v') g'^T and F(v', v) = F(v, v')^T, for every hidden layer."""
    layout, model, va = setup(name, seed=1)
    model.train(train_mode)  # train mode: BatchNorm uses batch statistics, still invariant
    vb = random_stack(NETS[name](), 3, seed=2)
    g = random_permutation(layout.spec, seed=3, batch=3)
    gp = random_permutation(layout.spec, seed=4, batch=3)
    with torch.no_grad():
        q = model(va, vb)
        q_perm = model(
            apply(layout.spec, g, va, batch_dims=1), apply(layout.spec, gp, vb, batch_dims=1)
        )
        q_swap = model(vb, va)
    assert list(q) == layout.hidden_groups
    for grp in q:
        n = layout.spec.groups[grp]
        assert q[grp].shape == (3, n, n)
        assert torch.allclose(q_perm[grp], gather_scores(q[grp], g[grp], gp[grp]), atol=1e-5)
        assert torch.allclose(q_swap[grp], q[grp].transpose(1, 2), atol=1e-5)
        assert q[grp].std() > 1e-3  # not a constant map


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize(
    "cfg",
    [
        dict(activation="tanh", pooling="mean"),  # analytic, as Prop. 5 assumes
        dict(activation="gelu", pooling="mean", set_layer="deepsets", messages=False),
        dict(),  # the defaults (ReLU, max pooling) in practice too
    ],
)
def test_untrained_model_recovers_a_planted_permutation_exactly(name, cfg):
    """Prop. 5: F(v, g#v) = g for random v and g, with no training; align() inverts it."""
    layout, model, va = setup(name, batch=4, seed=5, **cfg)
    g = random_permutation(layout.spec, seed=6, batch=4)
    vb = apply(layout.spec, g, va, batch_dims=1)
    perm = model.align(va, vb)
    want = invert(g)
    for grp in layout.hidden_groups:
        assert perm[grp].shape == g[grp].shape
        assert torch.equal(perm[grp], want[grp])
    back = apply(layout.spec, perm, vb, batch_dims=1)
    for k in va:
        assert torch.equal(back[k], va[k])


def test_align_uses_eval_mode_and_restores_it():
    layout, model, va = setup("mlp")
    model.train()
    g = random_permutation(layout.spec, seed=7, batch=3)
    perm = model.align(va, apply(layout.spec, g, va, batch_dims=1))
    assert model.training
    assert all(is_permutation(p) for p in perm.values())


def test_soft_is_doubly_stochastic_and_sharpens_to_align():
    layout, model, va = setup("mlp", activation="tanh", pooling="mean")
    g = random_permutation(layout.spec, seed=8, batch=3)
    vb = apply(layout.spec, g, va, batch_dims=1)
    model.eval()
    with torch.no_grad():
        q = model(va, vb)
        soft = model.soft(q)
        sharp = model.soft({k: 2000.0 * v for k, v in q.items()}, iters=50)
    hard = model.align(va, vb)
    for grp, p in soft.items():
        assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-4)
        assert torch.allclose(p.sum(-2), torch.ones_like(p.sum(-2)), atol=1e-2)
        assert torch.equal(sharp[grp].argmax(-1), hard[grp])
    # the same convention as apply(): the sharp soft permutation puts B into A's basis
    back = apply_soft(layout.spec, sharp, vb, batch_dims=1)
    assert all(torch.allclose(back[k], va[k], atol=1e-3) for k in va)


@pytest.mark.parametrize("train_mode", [True, False])
def test_backward_reaches_every_parameter(train_mode):
    layout, model, va = setup("cnn", dropout=0.1)
    vb = random_stack(NETS["cnn"](), 3, seed=9)
    model.train(train_mode)
    q = model(va, vb)
    loss = sum(
        -torch.log(model.soft(s).diagonal(dim1=-2, dim2=-1) + 1e-9).mean() for s in q.values()
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.log_scale.grad.abs() > 0


def test_downsample_embeds_the_input_axis_linearly_in_width():
    """Parameters grow by exactly d_0 * K with the input width (no flattening of d_0 into features)."""

    def count(d0, downsample):
        layout = WeightSpaceLayout.from_module(arch.mlp([d0, 16, 16, 10]))
        return DeepAlign(layout, DeepAlignConfig(downsample=downsample)).n_parameters()

    assert count(784, 8) - count(64, 8) == (784 - 64) * 8
    # without downsampling, only the per-position embedding grows (edge_channels=16 per input)
    assert count(784, None) - count(64, None) == (784 - 64) * 16
    assert count(784, 8) < 1_500_000


def test_batched_digits_mlps():
    """Batches of digits-shaped MLPs (64-32-32-32-10), several pairs in one pass."""
    module = arch.mlp([64, 32, 32, 32, 10])
    layout = WeightSpaceLayout.from_module(module)
    torch.manual_seed(0)
    model = DeepAlign(layout, DeepAlignConfig(**SMALL, downsample=8))
    va, vb = random_stack(module, 4, seed=10), random_stack(module, 4, seed=11)
    q = model(va, vb)
    assert [tuple(s.shape) for s in q.values()] == [(4, 32, 32)] * 3
    perm = model.align(va, vb)
    assert all(p.shape == (4, 32) and is_permutation(p) for p in perm.values())


def test_bad_inputs_raise():
    layout, model, va = setup("mlp")
    with pytest.raises(DeepAlignError, match="different numbers"):
        model(va, {k: v[:2] for k, v in va.items()})
    with pytest.raises(DeepAlignError):
        model(va, random_stack(arch.mlp([6, 5, 7, 4, 2]), 3))


def test_config_round_trips_and_rejects_bad_options():
    cfg = DeepAlignConfig(hidden=32, downsample=8, set_layer="deepsets", pooling="mean")
    assert DeepAlignConfig.from_json(cfg.to_json()) == cfg
    assert DeepAlignConfig().to_dict()["hidden"] == 64
    bad = [
        dict(set_layer="transformer"),
        dict(pooling="sum"),
        dict(activation="swish9"),
        dict(hidden=60),  # not divisible by 8 heads
        dict(downsample=0),
        dict(dropout=1.5),
        dict(edge_channels=0),
        dict(n_layers=-1),
    ]
    for kw in bad:
        with pytest.raises(DeepAlignError, match="Deep-Align config"):
            DeepAlignConfig(**kw)
    with pytest.raises(DeepAlignError, match="unknown option"):
        DeepAlignConfig.from_dict({"hiden": 3})
    with pytest.raises(DeepAlignError, match="JSON"):
        DeepAlignConfig.from_json("{")


def test_similarities_are_the_cosines_the_permutation_maximises():
    _, model, a = setup("mlp", batch=2, seed=1)
    _, _, b = setup("mlp", batch=2, seed=2)
    perm, sims = model.align_with_similarities(a, b)
    scores = model.eval()(a, b)
    for g, s in sims.items():
        assert s.shape == scores[g].shape and float(s.abs().max()) <= 1 + 1e-6
        assert torch.allclose(s * model.log_scale.exp() ** 2, scores[g], atol=1e-5)
        assert torch.equal(perm[g], linear_assignment(scores[g]))
