"""Merging N networks (MergeMany from a star start, in the first network's basis): exact on
permuted copies, monotone with WM, independent of how the other networks' neurons happen to be
ordered, and through the CLI."""

from __future__ import annotations

import pytest
import torch

import deepalign as da
from deepalign.core import permutation as P
from deepalign.errors import DeepAlignError
from deepalign.solvers.merge_many import mean_state, merge_many, pairwise_objective


def _nets(n: int, seed: int = 0):
    model = da.mlp([10, 12, 9, 4])
    spec = da.spec_for_module(model)
    states = []
    for i in range(n):
        torch.manual_seed(seed * 100 + i)
        states.append({k: v.clone() for k, v in da.mlp([10, 12, 9, 4]).state_dict().items()})
    return model, spec, states


def test_permuted_copies_merge_back_to_the_original():
    model, spec, (base,) = _nets(1)
    copies = [base] + [P.apply(spec, P.random_permutation(spec, seed=s), base) for s in (1, 2, 3)]
    merged, perms, info = merge_many(copies, spec, "wm")
    assert info["converged"]
    assert all(torch.equal(p, torch.arange(len(p))) for p in perms[0].values())
    for perm, copy in zip(perms, copies, strict=True):
        moved = P.apply(spec, perm, copy)
        assert all(torch.allclose(moved[k], base[k]) for k in base)
    x = torch.randn(16, 10)
    model.load_state_dict(merged)
    with torch.no_grad():
        got = model(x)
        model.load_state_dict(base)
        assert torch.allclose(got, model(x), atol=1e-6)


def test_wm_never_lowers_the_pairwise_objective():
    _, spec, states = _nets(5, seed=1)
    before = pairwise_objective(states, spec)
    _, perms, info = merge_many(states, spec, "wm", max_passes=6, seed=3)
    objectives = [h["objective"] for h in info["history"]]  # the star start, then each pass
    assert len(objectives) == info["passes"] + 1 >= 2
    assert all(b >= a - 1e-9 for a, b in zip(objectives, objectives[1:], strict=False))
    assert objectives[-1] > before  # random networks: aligning helps
    aligned = [P.apply(spec, p, s) for p, s in zip(perms, states, strict=True)]
    assert pairwise_objective(aligned, spec) == pytest.approx(objectives[-1])


def test_the_result_does_not_depend_on_the_other_networks_neuron_order():
    model, spec, states = _nets(4, seed=2)
    shuffled = [states[0]] + [
        P.apply(spec, P.random_permutation(spec, seed=10 + i), s) for i, s in enumerate(states[1:])
    ]
    m1, _, _ = merge_many(states, spec, "wm", seed=5)
    m2, _, _ = merge_many(shuffled, spec, "wm", seed=5)
    assert all(torch.allclose(m1[k], m2[k], atol=1e-6) for k in m1)


def test_mean_state_keeps_integer_buffers_from_the_first():
    a = {"w": torch.ones(2), "n": torch.tensor(3)}
    b = {"w": torch.zeros(2), "n": torch.tensor(7)}
    m = mean_state([a, b])
    assert torch.equal(m["w"], torch.full((2,), 0.5)) and int(m["n"]) == 3


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("one", "at least 2 networks"),
        ("passes", "max_passes"),
        ("shape", "network 2"),
        ("option", "unknown option"),
    ],
)
def test_bad_requests_are_one_line_errors(case, needle):
    _, spec, states = _nets(3)
    kw: dict = {}
    if case == "one":
        states = states[:1]
    elif case == "passes":
        kw["max_passes"] = 0
    elif case == "shape":
        states[2] = da.mlp([10, 5, 9, 4]).state_dict()
    else:
        kw["bogus"] = 1
    with pytest.raises(DeepAlignError) as err:
        merge_many(states, spec, "wm", **kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cli_merges_three_checkpoints(cli, tmp_path):
    model, spec, states = _nets(3, seed=4)
    paths = []
    for i, s in enumerate(states):
        model.load_state_dict(s)
        paths.append(tmp_path / f"m{i}.safetensors")
        da.save_model(model, paths[-1])
    out = tmp_path / "merged.safetensors"
    res = cli("merge", *paths, "--method", "wm", "--out", out)
    assert res.code == 0, res.err
    assert "mean of 3 networks" in res.out
    merged, _, meta = da.load_state(out)
    want, _, _ = merge_many(states, spec, "wm", seed=0)
    assert all(torch.allclose(merged[k], want[k]) for k in want)
    assert "deepalign.merged_from" in meta
    bad = tmp_path / "bad.safetensors"
    for args, needle in (
        (["--alpha", "0.3"], "--alpha applies to two"),
        (["--passes", "0"], "--passes"),
        (["-o", "max_sweeps=x"], "must be an integer"),
    ):
        res = cli("merge", *paths, "--out", bad, *args)
        assert res.code == 2 and needle in res.err, res.err
        assert len(res.err.strip().splitlines()) == 1 and not bad.exists()
