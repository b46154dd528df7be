"""Hand specs: a random permutation of every group keeps the function, a wrong spec does not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepalign as da
from arch_strategies import BUILDERS, Case
from deepalign.core.spec import AxisPerm, PermutationSpec
from deepalign.errors import DeepAlignError

TOL = 1e-4
ALL = st.one_of(*BUILDERS.values())


def moved_for_sure(spec: PermutationSpec, seed: int) -> da.Permutation:
    """A seeded random permutation that is not the identity on any group of size >= 2."""
    perm = da.random_permutation(spec, seed=seed)
    for g, p in perm.items():
        if len(p) > 1 and bool((p == torch.arange(len(p))).all()):
            perm[g] = torch.roll(p, 1)
    return perm


def outputs(model: torch.nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    other = da.build(da.describe(model)).eval()
    other.load_state_dict(state)
    with torch.no_grad():
        return other(x)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@settings(max_examples=12, deadline=None)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_random_permutation_keeps_the_function(kind: str, data, seed: int) -> None:
    case: Case = data.draw(BUILDERS[kind])
    spec = da.spec_for_module(case.model)
    sd = case.model.state_dict()
    spec.check(sd)
    assert da.verify(case.model, spec, case.x, seed=seed) < TOL
    perm = moved_for_sure(spec, seed)
    moved = da.apply(spec, perm, sd)
    torch.testing.assert_close(
        outputs(case.model, moved, case.x), case.model(case.x), atol=TOL, rtol=0
    )
    if any(n > 1 for n in spec.groups.values()):
        assert any(not torch.equal(moved[k], sd[k]) for k in sd), "the permutation moved nothing"
    # BatchNorm's counter is never permuted; its running stats are (they are random here)
    for k in sd:
        if k.endswith("num_batches_tracked"):
            assert spec.axes[k] == ()
        if k.endswith(("running_mean", "running_var")):
            assert spec.axes[k][0] is not None


def drop_axis(spec: PermutationSpec, key: str, axis: int) -> PermutationSpec:
    axes = dict(spec.axes)
    axes[key] = tuple(None if i == axis else e for i, e in enumerate(axes[key]))
    keep = lambda g: any((m.key, m.axis) != (key, axis) for m in spec.members[g])  # noqa: E731
    groups = {g: n for g, n in spec.groups.items() if keep(g)}
    return PermutationSpec(groups, axes)


@pytest.mark.parametrize(
    ("model", "shape", "key", "axis"),
    [
        (lambda: da.mlp([6, 5, 4, 3]), (6,), "2.weight", 1),  # next layer's input not permuted
        (lambda: da.mlp([6, 5, 4, 3]), (6,), "0.bias", 0),  # bias left behind
        (lambda: da.cnn(2, [5, 3], 3, 8), (2, 8, 8), "7.weight", 1),  # linear after flatten
        (lambda: da.resnet(2, [4, 6], 3), (2, 4, 4), "3.body.1.running_mean", 0),  # BN stats
        (lambda: da.resnet(2, [4, 6], 3), (2, 4, 4), "5.shortcut.0.weight", 0),  # one branch only
        (lambda: da.mlp([6, 5, 4, 3], norm="layernorm"), (6,), "1.weight", 0),
        (lambda: da.siren([2, 6, 5, 1]), (2,), "2.weight", 0),
    ],
)
def test_wrong_spec_is_caught_by_verify(model, shape, key, axis) -> None:
    from conftest import randomize_bn_stats

    torch.manual_seed(0)
    m = model().eval()
    randomize_bn_stats(m, seed=1)
    for ln in m.modules():  # fresh LayerNorm weights are all ones: dropping them would not show
        if isinstance(ln, torch.nn.LayerNorm):
            torch.nn.init.normal_(ln.weight)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(2))
    good = da.spec_for_module(m)
    assert good.axes[key][axis] is not None
    assert da.verify(m, good, x, seed=3) < TOL
    assert da.verify(m, drop_axis(good, key, axis), x, seed=3) > 1e-2


def test_wrong_block_structure_is_caught_by_verify() -> None:
    """Flatten(C,H,W): a channel moves a contiguous block of H*W inputs, not a strided set."""
    torch.manual_seed(0)
    m = da.cnn(2, [4], 3, 4).eval()  # conv 2->4, pool to 2x2, linear 16 -> 3
    x = torch.randn(8, 2, 4, 4)
    good = da.spec_for_module(m)
    assert good.axes["4.weight"][1] == AxisPerm(good.axes["0.weight"][0].group, 4)
    # the same permutation applied with the blocks interleaved (channel = fastest index) is wrong
    perm = moved_for_sure(good, 5)
    g = good.axes["0.weight"][0].group
    sd = m.state_dict()
    right = da.apply(good, perm, sd)
    wrong = dict(right)
    w = sd["4.weight"].reshape(3, 4, 4)  # (out, spatial, channel) under the wrong reading
    wrong["4.weight"] = w.transpose(1, 2)[:, perm[g]].transpose(1, 2).reshape(3, 16)
    ref = m(x).detach()
    assert (outputs(m, right, x) - ref).abs().max() < TOL
    assert (outputs(m, wrong, x) - ref).abs().max() > 1e-2


@settings(max_examples=15, deadline=None)
@given(case=ALL)
def test_spec_json_round_trip(case: Case) -> None:
    spec = da.spec_for_module(case.model)
    back = PermutationSpec.from_json(spec.to_json())
    assert back == spec
    assert back.same_structure(spec) and spec.same_structure(back)
    assert back.members == spec.members


def test_same_structure_ignores_names_but_not_axes() -> None:
    spec = da.spec_for_module(da.cnn(2, [5, 3], 3, 8))
    renamed = PermutationSpec.from_json(spec.to_json().replace('"P0"', '"conv0"'))
    assert renamed != spec and renamed.same_structure(spec)
    assert not drop_axis(spec, "7.weight", 1).same_structure(spec)
    assert spec.axes["7.weight"][1].inner == 4
    inner = dict(spec.axes)
    inner["7.weight"] = (None, AxisPerm(spec.axes["7.weight"][1].group, 1))
    assert not PermutationSpec(spec.groups, inner).same_structure(spec)


def test_check_names_missing_extra_keys_and_wrong_sizes() -> None:
    m = da.mlp([6, 5, 4, 3], norm="batchnorm")
    spec, sd = da.spec_for_module(m), m.state_dict()
    spec.check(sd)
    with pytest.raises(DeepAlignError, match=r"missing 0\.bias"):
        spec.check({k: v for k, v in sd.items() if k != "0.bias"}, where="f.safetensors")
    with pytest.raises(DeepAlignError, match=r"unexpected stray\.weight"):
        spec.check({**sd, "stray.weight": torch.zeros(1)})
    with pytest.raises(DeepAlignError, match=r"0\.weight axis 0 has size 7, expected 5"):
        spec.check({**sd, "0.weight": torch.zeros(7, 6), "0.bias": torch.zeros(5)})
    with pytest.raises(DeepAlignError, match=r"0\.bias has 2 dims"):
        spec.check({**sd, "0.bias": torch.zeros(5, 1)})
    stacked = {k: torch.stack([v, v]) for k, v in sd.items()}
    spec.check(stacked, batch_dims=1)
    with pytest.raises(DeepAlignError):
        spec.check(stacked)


def test_malformed_spec_data_is_one_line_error() -> None:
    for text in ("not json", '{"groups": {}}', '{"groups": {"a": 2}, "axes": {"w": [["a"]]}}'):
        with pytest.raises(DeepAlignError) as info:
            PermutationSpec.from_json(text)
        assert "\n" not in str(info.value)
    with pytest.raises(DeepAlignError, match="unknown group"):
        PermutationSpec({"a": 2}, {"w": (AxisPerm("b"),)})
    with pytest.raises(DeepAlignError, match="acts on no tensor"):
        PermutationSpec({"a": 2}, {"w": (None,)})
