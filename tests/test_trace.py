"""The torch.fx tracer: same specs as the hand rules, any traceable module, loud on unknown ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deepalign as da
from arch_strategies import BUILDERS, Case
from conftest import recovers_planted
from deepalign.core.spec import AxisPerm, PermutationSpec
from deepalign.core.spec import Concat as ConcatEntry
from deepalign.errors import DeepAlignError

TOL = 1e-4


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@settings(max_examples=12, deadline=None)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_traced_spec_equals_hand_spec(kind: str, data, seed: int) -> None:
    case: Case = data.draw(BUILDERS[kind])
    traced = da.spec_from_model(case.model, case.x)
    hand = da.spec_for_module(case.model)
    assert traced.same_structure(hand), (traced.describe(), hand.describe())
    assert da.verify(case.model, traced, case.x, seed=seed) < TOL


def test_group_names_are_readable_and_deterministic() -> None:
    m = da.cnn(1, [3, 5], 4, 8)
    x = torch.randn(2, 1, 8, 8)
    a, b = da.spec_from_model(m, x), da.spec_from_model(da.cnn(1, [3, 5], 4, 8), x)
    assert list(a.groups) == ["0.out", "3.out"]
    assert a.to_json() == b.to_json()


class TwoPath(nn.Module):
    """A hand-written forward: residual add, functional ops, view/flatten, a mean, scalars."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.ln = nn.LayerNorm(7)
        self.gain = nn.Parameter(torch.randn(7))
        self.head = nn.Linear(7, 3)
        self.side = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.c1(x)))
        h = h + 0.5 * torch.tanh(self.c2(h))  # residual: c1's and c2's outputs share a group
        h = F.max_pool2d(torch.sin(self.c3(h)), 2)
        pooled = h.mean((2, 3))  # spatial mean: the channels stay a group
        z = h.view(h.size(0), -1)  # flatten C,H,W: channel blocks of 16
        z = self.ln(torch.sigmoid(self.fc(z)) * self.gain)
        return self.head(z) + self.side(pooled.relu())


def test_custom_module_with_residual_in_forward() -> None:
    from conftest import randomize_bn_stats

    torch.manual_seed(0)
    m = TwoPath().eval()
    randomize_bn_stats(m, seed=1)
    nn.init.normal_(m.ln.weight)
    x = torch.randn(4, 3, 8, 8)
    spec = da.spec_from_model(m, x)
    a, b, c = AxisPerm("a"), AxisPerm("b"), AxisPerm("c")
    n = None
    expected = PermutationSpec(
        {"a": 6, "b": 5, "c": 7},
        {
            "c1.weight": (a, n, n, n),
            "c1.bias": (a,),
            "bn.weight": (a,),
            "bn.bias": (a,),
            "bn.running_mean": (a,),
            "bn.running_var": (a,),
            "bn.num_batches_tracked": (),
            "c2.weight": (a, a, n, n),
            "c3.weight": (b, a, n, n),
            "c3.bias": (b,),
            "fc.weight": (c, AxisPerm("b", 16)),
            "fc.bias": (c,),
            "ln.weight": (c,),
            "ln.bias": (c,),
            "gain": (c,),
            "head.weight": (n, c),
            "head.bias": (n,),
            "side.weight": (n, b),
            "side.bias": (n,),
        },
    )
    assert spec.same_structure(expected), spec.describe()
    assert da.verify(m, spec, x, seed=2) < TOL
    # and the spec is not vacuous: leaving the gain out breaks the function
    broken = dict(spec.axes)
    broken["gain"] = (None,)
    assert da.verify(m, PermutationSpec(spec.groups, broken), x, seed=2) > 1e-2


class InputSkip(nn.Module):
    """``x + layer(x)``: the layer's outputs are tied to the network input, so never permuted."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(x + self.a(x))))


def test_axes_tied_to_inputs_are_not_permuted() -> None:
    m = InputSkip()
    x = torch.randn(3, 4)
    spec = da.spec_from_model(m, x)
    assert spec.groups == {"b.out": 6}
    assert spec.axes["a.weight"] == (None, None) and spec.axes["a.bias"] == (None,)
    assert da.verify(m, spec, x) < TOL


def test_tracing_leaves_the_model_as_it_was() -> None:
    from conftest import randomize_bn_stats

    m = da.resnet(2, [3, 4], 2).train()
    randomize_bn_stats(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    da.spec_from_model(m, torch.randn(4, 2, 4, 4))
    assert all(mod.training for mod in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


class Cumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cumsum(self.a(x), dim=-1))


class Rotate(nn.Module):
    """Rotary-style mixing of a hidden axis by roll: no permutation rule."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.roll(self.a(x), 1, dims=-1))


class Indexing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)[:, :2])


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else x


@pytest.mark.parametrize(
    ("model", "shape", "pattern"),
    [
        (Cumsum, (2, 3), r"function torch\.cumsum \(fx node 'cumsum'\)"),
        (Rotate, (2, 3), r"function torch\.roll \(fx node 'roll'\)"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.LocalResponseNorm(2)),
            (2, 3, 4, 4),
            "module LocalResponseNorm",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(2, 4, 1, groups=2), nn.Flatten()),
            (1, 2, 2, 2),
            "groups=2",
        ),
        (Branchy, (2, 3), r"Branchy is not traceable with torch\.fx \(TraceError"),
        (
            lambda: da.mlp([3, 4, 2]),
            (2, 5),
            r"input of shape \(2, 5\) does not run .* fx node '_0'",
        ),
    ],
)
def test_unsupported_models_give_one_line_errors(model, shape, pattern) -> None:
    with pytest.raises(DeepAlignError, match=pattern) as info:
        da.spec_from_model(model(), torch.randn(*shape))
    assert "\n" not in str(info.value)


def test_a_new_op_is_a_few_local_lines() -> None:
    from deepalign.core import trace, trace_ops

    assert torch.cumsum not in trace_ops._FUNCTIONS
    try:

        @trace.handles(torch.cumsum)
        def _(op: trace.Op) -> None:  # cumsum mixes the summed axis: only the batch axis moves
            op.leading(1)

        spec = da.spec_from_model(Cumsum(), torch.randn(2, 3))
        assert spec.groups == {}  # the hidden axis is fixed, so nothing is permuted (and no error)
        assert da.verify(Cumsum(), spec, torch.randn(2, 3)) == 0.0
    finally:
        del trace_ops._FUNCTIONS[torch.cumsum]


class Tied(nn.Module):
    """Two names for one weight: a permutation must move both names the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 5)
        self.c.weight = self.b.weight
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.out(torch.relu(self.c(torch.relu(self.b(h)))))


def test_tied_weights_share_their_permutation() -> None:
    m = Tied()
    x = torch.randn(6, 4)
    spec = da.spec_from_model(m, x)
    assert spec.axes["b.weight"] == spec.axes["c.weight"]
    assert len(spec.groups) == 1  # a, b and c outputs: one group, as b's weight is c's weight
    assert da.verify(m, spec, x) < TOL


class TwoBranches(nn.Module):
    """Two branches concatenated on channels, a transpose, two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 4, 1)
        self.mix = nn.Conv2d(7, 5, 1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(y))], dim=1)
        z = torch.relu(self.mix(h)).mean((2, 3)).unsqueeze(1).transpose(1, 2).flatten(1)
        return self.head(z)


def test_concatenated_branches_move_as_parts_of_one_axis() -> None:
    m = TwoBranches()
    x, y = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    spec = da.spec_from_model(m, (x, y))
    # the 7 channels of mix's input are a's 3 then b's 4: a block-diagonal permutation
    assert spec.groups == {"a.out": 3, "b.out": 4, "mix.out": 5}
    cat = ((AxisPerm("a.out"), 3), (AxisPerm("b.out"), 4))
    assert spec.axes["mix.weight"] == (AxisPerm("mix.out"), ConcatEntry(cat), None, None)
    assert spec.axes["head.weight"] == (None, AxisPerm("mix.out"))
    assert da.PermutationSpec.from_json(spec.to_json()) == spec
    perm = da.random_permutation(spec, seed=1)
    moved = da.permuted_module(m, spec, perm)
    torch.testing.assert_close(moved(x, y), m(x, y), atol=TOL, rtol=0)


def test_a_partial_slice_pins_the_sliced_axis() -> None:
    """Slicing part of a hidden axis keeps it unpermuted (and the function unchanged)."""
    model, x = Indexing(), torch.randn(5, 3)
    spec = da.spec_from_model(model, x)
    assert "a.out" not in spec.groups and spec.axes["a.weight"] == (None, None)
    assert da.verify(model, spec, x) < 1e-6


class Unflatten(nn.Module):
    """A Linear's output unflattened into a feature map: channels of 9 entries each."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.conv = nn.Linear(5, 2 * 3 * 3), nn.Conv2d(2, 4, 3, padding=1)
        self.out = nn.Linear(4 * 9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x)).view(-1, 2, 3, 3)
        return self.out(torch.relu(self.conv(h)).flatten(1))


def test_an_unflattened_feature_map_keeps_its_channel_group() -> None:
    x = torch.randn(3, 5)
    spec = da.spec_from_model(Unflatten(), x)
    assert spec.axes["fc.weight"] == (AxisPerm("fc.out", 9), None) and spec.groups["fc.out"] == 2
    assert da.verify(Unflatten(), spec, x) < TOL


class CatFlatten(nn.Module):
    """Two conv branches concatenated, flattened into a Linear: blocks of 16 inputs per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(5 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1).flatten(1))


class DenseConcat(nn.Module):
    """DenseNet-style: a layer's input and output concatenated, then normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(11, 3)
        self.norm = nn.LayerNorm(11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(self.norm(torch.cat([h, torch.relu(self.b(h))], -1)))


class GatedMLP(nn.Module):
    """GLU-style: one Linear chunked into a value half and a gate half."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 12), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up(x).chunk(2, -1)
        return self.down(a * torch.sigmoid(b))


@pytest.mark.parametrize(
    ("model", "shape", "key", "want"),
    [
        (
            CatFlatten,
            (2, 1, 4, 4),
            "fc.weight",
            (None, ConcatEntry(((AxisPerm("a.out", 16), 48), (AxisPerm("b.out", 16), 32)))),
        ),
        (
            DenseConcat,
            (3, 4),
            "norm.weight",
            (ConcatEntry(((AxisPerm("a.out"), 6), (AxisPerm("b.out"), 5))),),
        ),
        (
            GatedMLP,
            (3, 4),
            "up.bias",
            (ConcatEntry(((AxisPerm("up.out[0,1]"), 6), (AxisPerm("up.out[0,1]"), 6))),),
        ),
    ],
)
def test_concatenated_and_chunked_axes_move_part_by_part(model, shape, key, want) -> None:
    m, x = model().eval(), torch.randn(*shape)
    spec = da.spec_from_model(m, x)
    assert spec.axes[key] == want
    for seed in range(3):
        assert da.verify(m, spec, x, seed=seed) < TOL
    assert recovers_planted(spec, m.state_dict(), "wm", seed=4)[0]


class GroupNormNet(nn.Module):
    """Convs with GroupNorm: channels move inside their group, whole groups move together."""

    def __init__(self, mixed: bool = False) -> None:
        super().__init__()
        self.mixed = mixed
        self.c1, self.g1 = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 8 if mixed else 6, 3, padding=1)
        self.g2 = nn.GroupNorm(2, 8 if mixed else 6)
        self.fc = nn.Linear(8 if mixed else 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.g1(self.c1(x)))
        out = self.g2(self.c2(h))
        out = F.relu(out + h) if self.mixed else F.relu(out)  # mixed: 4 and 2 groups on one axis
        return self.fc(out.mean((2, 3)))


def test_group_norm_groups_are_heads_and_conflicting_groupings_stay_fixed() -> None:
    x = torch.randn(2, 1, 5, 5)
    m = GroupNormNet().eval()
    spec = da.spec_from_model(m, x)
    assert spec.heads == {"c1.out": "g1.groups", "c2.out": "g2.groups"}
    assert (spec.groups["g1.groups"], spec.head_size("c1.out")) == (4, 2)
    for seed in range(3):
        assert da.verify(m, spec, x, seed=seed) < TOL
    assert recovers_planted(spec, m.state_dict(), "wm", seed=5)[0]
    mixed = GroupNormNet(mixed=True).eval()
    assert da.spec_from_model(mixed, x).groups == {}  # never guessed


class EinsumMLP(nn.Module):
    """Linear layers written as einsums of raw parameters (one with an implicit output)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(3, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.einsum("bi,oi->bo", x, self.w1) + self.b1)
        return torch.einsum("bh,oh", h, self.w2)  # implicit: "bo", h summed


def test_einsum_links_letters_and_contracts_summed_ones() -> None:
    x = torch.randn(5, 4)
    m = EinsumMLP()
    spec = da.spec_from_model(m, x)
    g = spec.axes["w1"][0].group
    assert spec.axes["b1"] == (AxisPerm(g),) and spec.axes["w2"] == (None, AxisPerm(g))
    assert spec.axes["w1"][1] is None
    for seed in range(3):
        assert da.verify(m, spec, x, seed=seed) < TOL
