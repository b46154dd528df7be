"""The weight-space view: shapes, which state entry lands where, exact round trips, the group action."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepalign.core import arch
from deepalign.core.functional import stack_states
from deepalign.core.permutation import apply, random_permutation
from deepalign.errors import DeepAlignError
from deepalign.nn.weight_space import WeightSpaceLayout, boundary_perms, permute_view


def random_stack(module: nn.Module, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = [
        {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}
        for _ in range(n)
    ]
    return stack_states(states)


MODELS = {
    "mlp": lambda: arch.mlp([6, 5, 4, 3]),
    # 8x8 input, two 2x2 pools -> last map 5 x 2 x 2, so the head is folded to (5, 10, S=4)
    "cnn": lambda: arch.cnn(3, [4, 5], 10, image_size=8),
    "siren": lambda: arch.siren([2, 8, 8, 1]),
}
# (widths, per-layer F) worked out by hand from the architectures above
EXPECTED = {
    "mlp": ((6, 5, 4, 3), (1, 1, 1)),
    "cnn": ((3, 4, 5, 10), (9, 9, 4)),
    "siren": ((2, 8, 8, 1), (1, 1, 1)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_view_shapes(name):
    layout = WeightSpaceLayout.from_module(MODELS[name]())
    widths, feats = EXPECTED[name]
    assert layout.widths == widths
    assert layout.features == feats
    assert layout.max_features == max(feats)
    assert layout.hidden_groups == ["P0", "P1"]
    state = random_stack(MODELS[name](), 2)
    weights, biases = layout.to_view(state)
    f = max(feats)
    assert [tuple(w.shape) for w in weights] == [(2, widths[i], widths[i + 1], f) for i in range(3)]
    assert [tuple(b.shape) for b in biases] == [(2, widths[i + 1], f) for i in range(3)]
    uw, ub = layout.to_view(state, pad=False)
    assert [w.shape[-1] for w in uw] == list(feats)
    assert all(b.shape[-1] == 1 for b in ub)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("pad", [True, False])
def test_round_trip_is_exact(name, pad):
    layout = WeightSpaceLayout.from_module(MODELS[name]())
    state = random_stack(MODELS[name](), 3, seed=1)
    back = layout.from_view(*layout.to_view(state, pad=pad))
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_padding_is_zero():
    layout = WeightSpaceLayout.from_module(MODELS["cnn"]())
    weights, biases = layout.to_view(random_stack(MODELS["cnn"](), 2))
    assert torch.all(weights[2][..., 4:] == 0)
    assert all(torch.all(b[..., 1:] == 0) for b in biases)


def test_entries_land_where_the_paper_says():
    """(in, out, F): Linear transposed; conv kernel flattened into F; the head folded (C, out, S)."""
    module = MODELS["cnn"]()
    layout = WeightSpaceLayout.from_module(module)
    state = random_stack(module, 2, seed=2)
    weights, biases = layout.to_view(state)
    conv, head = state["3.weight"], state["7.weight"]  # (5, 4, 3, 3) and (10, 5*4)
    for b, o, i, kh, kw in [(0, 0, 0, 0, 0), (1, 4, 3, 2, 1), (0, 2, 1, 1, 2)]:
        assert weights[1][b, i, o, kh * 3 + kw] == conv[b, o, i, kh, kw]
    for b, o, c, s in [(0, 0, 0, 0), (1, 9, 4, 3), (0, 3, 2, 1)]:
        assert weights[2][b, c, o, s] == head[b, o, c * 4 + s]
    assert torch.equal(biases[1][..., 0], state["3.bias"])
    mlp = MODELS["mlp"]()
    st = random_stack(mlp, 2, seed=3)
    w, _ = WeightSpaceLayout.from_module(mlp).to_view(st)
    assert w[1][1, 3, 2, 0] == st["2.weight"][1, 2, 3]


@pytest.mark.parametrize("name", list(MODELS))
def test_group_action_is_an_index_permutation_of_the_view(name):
    """Permuting the state with the spec == permuting the view's hidden axes (features never move)."""
    module = MODELS[name]()
    layout = WeightSpaceLayout.from_module(module)
    state = random_stack(module, 3, seed=4)
    perm = random_permutation(layout.spec, seed=5, batch=3)
    direct = layout.to_view(apply(layout.spec, perm, state, batch_dims=1))
    via_view = permute_view(*layout.to_view(state), boundary_perms(layout, perm))
    for a, b in zip(direct[0] + direct[1], via_view[0] + via_view[1], strict=True):
        assert torch.equal(a, b)


def test_from_config_matches_from_module():
    module = MODELS["cnn"]()
    a = WeightSpaceLayout.from_module(module)
    b = WeightSpaceLayout.from_config(arch.describe(module))
    assert a.layers == b.layers
    assert a.arch == arch.describe(module)


def test_flattened_image_mlp():
    layout = WeightSpaceLayout.from_module(arch.mlp([16, 8, 4], flatten_input=True))
    assert layout.widths == (16, 8, 4)
    assert layout.features == (1, 1)


def test_linear_without_bias_reads_as_zero_bias():
    module = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2))
    layout = WeightSpaceLayout.from_module(module)
    state = random_stack(module, 2)
    weights, biases = layout.to_view(state)
    assert torch.all(biases[0] == 0)
    back = layout.from_view(weights, biases)
    assert set(back) == {"0.weight", "2.weight", "2.bias"}
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (lambda: arch.resnet(3, [4, 8], 10), "residual"),
        (lambda: arch.mlp([6, 5, 3], norm="batchnorm"), "BatchNorm1d"),
        (lambda: arch.mlp([6, 5, 3], norm="layernorm"), "LayerNorm"),
        (lambda: arch.cnn(3, [4], 10, image_size=4, batchnorm=True), "BatchNorm2d"),
        (lambda: nn.Sequential(nn.Linear(4, 2)), "hidden layer"),
    ],
)
def test_unsupported_architectures_are_named(module, match):
    with pytest.raises(DeepAlignError, match=match):
        WeightSpaceLayout.from_module(module())


def test_bad_states_and_views_raise():
    module = MODELS["mlp"]()
    layout = WeightSpaceLayout.from_module(module)
    state = random_stack(module, 2)
    with pytest.raises(DeepAlignError, match="missing"):
        layout.to_view({k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(DeepAlignError, match="no batch dim"):
        layout.to_view(module.state_dict())
    with pytest.raises(DeepAlignError, match=r"expects \(5, 6\)"):
        layout.to_view(random_stack(arch.mlp([7, 5, 4, 3]), 2))
    weights, biases = layout.to_view(state)
    with pytest.raises(DeepAlignError, match="does not fit"):
        layout.from_view((weights[0][:, :-1], *weights[1:]), biases)
    with pytest.raises(DeepAlignError, match="layers"):
        layout.from_view(weights[:2], biases[:2])
