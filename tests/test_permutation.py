"""Permutation algebra: inverse, composition, hard vs soft application, batching, JSON."""

from __future__ import annotations

import pytest
import torch

import deepalign as da
from deepalign.core import permutation as P
from deepalign.errors import DeepAlignError


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = da.cnn(3, [5, 7, 6], 4, 8)
    return model, da.spec_for_module(model)


def test_invert_undoes_apply(net):
    model, spec = net
    sd = model.state_dict()
    p = da.random_permutation(spec, seed=1)
    back = da.apply(spec, da.invert(p), da.apply(spec, p, sd))
    for k in sd:
        assert torch.equal(back[k], sd[k])


def test_compose_is_sequential_application(net):
    model, spec = net
    sd = model.state_dict()
    f, t = da.random_permutation(spec, seed=1), da.random_permutation(spec, seed=2)
    one = da.apply(spec, da.compose(f, t), sd)
    two = da.apply(spec, t, da.apply(spec, f, sd))
    assert all(torch.equal(one[k], two[k]) for k in sd)


def test_identity_changes_nothing_and_random_moves_something(net):
    model, spec = net
    sd = model.state_dict()
    same = da.apply(spec, da.identity(spec), sd)
    assert all(torch.equal(same[k], sd[k]) for k in sd)
    moved = da.apply(spec, da.random_permutation(spec, seed=3), sd)
    assert any(not torch.equal(moved[k], sd[k]) for k in sd)


def test_soft_matches_hard(net):
    model, spec = net
    sd = model.state_dict()
    p = da.random_permutation(spec, seed=4)
    hard = da.apply(spec, p, sd)
    soft = da.apply_soft(spec, P.to_matrices(p), sd)
    for k in sd:
        torch.testing.assert_close(hard[k], soft[k])
    assert all(
        torch.equal(a, b)
        for a, b in zip(P.from_matrices(P.to_matrices(p)).values(), p.values(), strict=True)
    )


def test_batched_apply_matches_per_item(net):
    model, spec = net
    sds = [da.cnn(3, [5, 7, 6], 4, 8).state_dict() for _ in range(3)]
    stacked = {k: torch.stack([s[k] for s in sds]) for k in sds[0]}
    perms = da.random_permutation(spec, seed=5, batch=3)
    out = da.apply(spec, perms, stacked, batch_dims=1)
    soft = da.apply_soft(spec, P.to_matrices(perms), stacked, batch_dims=1)
    for i in range(3):
        single = da.apply(spec, {g: p[i] for g, p in perms.items()}, sds[i])
        for k in single:
            assert torch.equal(out[k][i], single[k])
            torch.testing.assert_close(soft[k][i], single[k])


def test_seeded_random_is_reproducible(net):
    _, spec = net
    a, b = da.random_permutation(spec, seed=7), da.random_permutation(spec, seed=7)
    assert all(torch.equal(a[g], b[g]) for g in a)
    assert all(P.is_permutation(p) for p in a.values())


def test_json_round_trip(net, tmp_path):
    _, spec = net
    p = da.random_permutation(spec, seed=8)
    P.save_json(p, tmp_path / "p.json")
    q = P.load_json(tmp_path / "p.json", spec)
    assert all(torch.equal(p[g], q[g]) for g in p)


def test_bad_permutations_are_refused(net, tmp_path):
    model, spec = net
    bad = tmp_path / "bad.json"
    bad.write_text('{"perm": {"P0": [0, 0, 1, 2, 3]}}')
    with pytest.raises(DeepAlignError, match="not a permutation"):
        P.load_json(bad)
    wrong = {g: torch.arange(n + 1) for g, n in spec.groups.items()}
    with pytest.raises(DeepAlignError, match="size"):
        da.apply(spec, wrong, model.state_dict())
