"""Classic solvers: planted permutations, WM's monotone descent, Sinkhorn, the registry contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepalign as da
from conftest import randomize_bn_stats
from deepalign.core import permutation as P
from deepalign.errors import DeepAlignError
from deepalign.solvers import align
from deepalign.solvers.objective import l2_distance, weight_inner
from deepalign.solvers.wm import Scores

ARCHS = {
    "mlp": (lambda: da.mlp([64, 24, 20, 10], flatten_input=True), (1, 8, 8)),
    "cnn": (lambda: da.cnn(3, [6, 8, 10], 5, 8), (3, 8, 8)),
    "resnet": (lambda: da.resnet(3, [6, 10], 5), (3, 8, 8)),
    # a hidden Linear after Flatten: a channel group acts on blocks of 16 inputs
    "cnn_head": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(6 * 16, 12),
            nn.ReLU(),
            nn.Linear(12, 5),
        ),
        (3, 8, 8),
    ),
}


def _planted(name: str, seed: int = 0):
    make, shape = ARCHS[name]
    torch.manual_seed(seed)
    model = make()
    randomize_bn_stats(model, seed=seed)
    spec = da.spec_for_module(model)
    a = model.state_dict()
    planted = da.random_permutation(spec, seed=seed + 100)
    b = da.apply(spec, planted, a)
    return model, spec, a, b, planted, shape


def _same(p: dict, q: dict) -> bool:
    return set(p) == set(q) and all(torch.equal(p[g].cpu(), q[g].cpu()) for g in p)


@pytest.mark.parametrize("name", list(ARCHS))
def test_wm_recovers_planted_permutation(name):
    model, spec, a, b, planted, _ = _planted(name)
    perm, info = align(a, b, spec, "wm", seed=1)
    assert _same(perm, da.invert(planted))
    aligned = da.apply(spec, perm, b)
    for k in a:  # every tensor, BatchNorm running statistics included, back in A's order
        assert torch.equal(aligned[k], a[k]), k
    assert info["l2"] == 0.0 and info["l2_before"] > 0


@pytest.mark.parametrize("name", list(ARCHS))
def test_am_recovers_planted_permutation(name):
    model, spec, a, b, planted, shape = _planted(name)
    x = torch.randn(200, *shape, generator=torch.Generator().manual_seed(5))
    perm, info = align(a, b, spec, "am", module=model, data=x, batch_size=64)
    assert _same(perm, da.invert(planted))
    assert info["examples"] == 200


def test_am_streams_a_dataset_and_matches_tensor_input():
    from deepalign.data import Dataset

    model, spec, a, b, planted, shape = _planted("cnn", seed=3)
    x = torch.randn(90, *shape, generator=torch.Generator().manual_seed(6))
    ds = Dataset(x, torch.zeros(90, dtype=torch.long), 5, "synthetic")
    p1, _ = align(a, b, spec, "am", module=model, data=ds, batch_size=16)
    p2, _ = align(a, b, spec, "am", module=model, data=x, batch_size=90)
    assert _same(p1, p2) and _same(p1, da.invert(planted))


def test_wm_recovers_planted_permutation_under_weight_noise():
    model, spec, a, b, planted, _ = _planted("mlp", seed=2)
    g = torch.Generator().manual_seed(9)
    noisy = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) for k, v in b.items()}
    perm, _ = align(a, noisy, spec, "wm")
    assert _same(perm, da.invert(planted))


@pytest.mark.parametrize("name", list(ARCHS))
def test_wm_objective_never_decreases_and_is_a_local_optimum(name):
    make, _ = ARCHS[name]
    torch.manual_seed(11)
    m1, m2 = make(), make()
    randomize_bn_stats(m1, 1)
    randomize_bn_stats(m2, 2)
    spec = da.spec_for_module(m1)
    a, b = m1.state_dict(), m2.state_dict()
    perm, info = align(a, b, spec, "wm", seed=4)
    hist = info["history"]
    assert len(hist) == info["sweeps"] + 1
    assert all(y >= x - 1e-9 * abs(x) for x, y in zip(hist, hist[1:], strict=False))
    assert hist[0] == pytest.approx(info["objective_before"], rel=1e-9)
    assert hist[-1] == pytest.approx(info["objective"], rel=1e-5)  # the tracked gains add up
    assert info["objective"] > info["objective_before"]
    assert info["l2"] < info["l2_before"]
    # no single swap of two neurons in any group improves the result (checked by brute force)
    best = weight_inner(a, da.apply(spec, perm, b), spec)
    gen = torch.Generator().manual_seed(0)
    for g_name, n in spec.groups.items():
        for _ in range(10):
            i, j = torch.randperm(n, generator=gen)[:2].tolist()
            q = {h: p.clone() for h, p in perm.items()}
            q[g_name][[i, j]] = q[g_name][[j, i]]
            assert weight_inner(a, da.apply(spec, q, b), spec) <= best + 1e-6 * abs(best)


def _reference_wm(a, b, spec, seed):
    """Git Re-Basin's loop, written plainly: every group every sweep, float64, full re-permutation."""
    from scipy.optimize import linear_sum_assignment

    gen = torch.Generator().manual_seed(seed)
    perm = da.identity(spec)
    groups = list(spec.groups)
    for _ in range(100):
        progress = False
        for i in torch.randperm(len(groups), generator=gen).tolist():
            g, n = groups[i], spec.groups[groups[i]]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for m in spec.members[g]:
                wa, wb = a[m.key].double(), b[m.key].double()
                for ax, e in enumerate(spec.axes[m.key]):
                    if e is not None and ax != m.axis:
                        wb = wb.index_select(ax, perm[e.group])
                cost += (
                    wa.movedim(m.axis, 0).reshape(n, -1) @ wb.movedim(m.axis, 0).reshape(n, -1).T
                )
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            cols = torch.from_numpy(cols)
            rows = torch.arange(n)
            if cost[rows, cols].sum() > cost[rows, perm[g]].sum() + 1e-12:
                progress = True
            perm[g] = cols
        if not progress:
            return perm


def test_wm_from_identity_equals_the_reference_loop():
    """Skipping unchanged groups and low-rank score updates change the cost, not the answer."""
    torch.manual_seed(21)
    m1, m2 = da.mlp([20, 30, 30, 30, 5]), da.mlp([20, 30, 30, 30, 5])
    spec = da.spec_for_module(m1)
    a, b = m1.state_dict(), m2.state_dict()
    for seed in range(3):
        perm, info = align(a, b, spec, "wm", seed=seed, start="identity")
        assert _same(perm, _reference_wm(a, b, spec, seed))
        assert info["solves"] <= info["sweeps"] * len(spec.groups)


def test_wm_from_the_answer_stops_after_one_sweep():
    model, spec, a, b, planted, _ = _planted("resnet", seed=4)
    answer = da.invert(planted)
    perm, info = align(a, b, spec, "wm", init=answer)
    assert info["sweeps"] == 1 and _same(perm, answer)


def test_wm_is_deterministic_per_seed_and_respects_max_sweeps():
    torch.manual_seed(0)
    m1, m2 = da.mlp([16, 40, 40, 40, 4]), da.mlp([16, 40, 40, 40, 4])
    spec = da.spec_for_module(m1)
    a, b = m1.state_dict(), m2.state_dict()
    p1, _ = align(a, b, spec, "wm", seed=3)
    p2, _ = align(a, b, spec, "wm", seed=3)
    assert _same(p1, p2)
    _, info = align(a, b, spec, "wm", seed=3, max_sweeps=1)
    assert info["sweeps"] == 1


@pytest.mark.parametrize("name", list(ARCHS))
def test_incremental_scores_equal_rebuilt_ones(name):
    make, _ = ARCHS[name]
    torch.manual_seed(5)
    m1, m2 = make(), make()
    spec = da.spec_for_module(m1)
    a, b = m1.state_dict(), m2.state_dict()
    groups = list(spec.groups)
    cached = Scores(a, b, spec, groups)
    perm = da.identity(spec)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        for g in groups:
            got = cached.score(g, perm).clone()
            want = Scores(a, b, spec, [g]).score(g, perm)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        h = groups[step % len(groups)]  # move a few neurons of one group
        i, j = torch.randperm(spec.groups[h], generator=gen)[:2].tolist()
        perm[h][[i, j]] = perm[h][[j, i]]
    assert cached.updates > 0


def test_score_matrix_is_the_objective_along_one_group():
    """sum_i C_g[i, p[i]] equals the objective up to terms that do not involve group g."""
    torch.manual_seed(2)
    m1, m2 = da.cnn(3, [6, 8], 5, 8), da.cnn(3, [6, 8], 5, 8)
    spec = da.spec_for_module(m1)
    a, b = m1.state_dict(), m2.state_dict()
    base = da.random_permutation(spec, seed=1)
    for g in spec.groups:
        c = Scores(a, b, spec, [g]).score(g, base)
        q = dict(base)
        q[g] = da.random_permutation(spec, seed=7)[g]
        lhs = float(
            c[torch.arange(len(q[g])), q[g]].sum() - c[torch.arange(len(base[g])), base[g]].sum()
        )
        rhs = weight_inner(a, da.apply(spec, q, b), spec) - weight_inner(
            a, da.apply(spec, base, b), spec
        )
        assert abs(lhs - rhs) < 1e-4 * (1 + abs(rhs))


def test_objective_and_distance_agree():
    torch.manual_seed(0)
    m1, m2 = da.mlp([8, 6, 3]), da.mlp([8, 6, 3])
    spec = da.spec_for_module(m1)
    a, b = m1.state_dict(), m2.state_dict()
    sq = lambda s: sum(float((v.double() ** 2).sum()) for v in s.values())  # noqa: E731
    want = (sq(a) + sq(b) - 2 * weight_inner(a, b, spec)) ** 0.5
    assert abs(l2_distance(a, b, spec) - want) < 1e-6


def test_running_stats_are_permuted_but_not_matched():
    model, spec, a, b, planted, _ = _planted("resnet", seed=6)
    scrambled = {
        k: (torch.rand_like(v) + 0.5 if k.endswith("running_var") else v) for k, v in b.items()
    }
    perm, info = align(a, scrambled, spec, "wm")
    assert _same(perm, da.invert(planted))
    assert info["objective"] == pytest.approx(weight_inner(a, a, spec), rel=1e-6)


# -- Sinkhorn -----------------------------------------------------------------------------------
def _pair(seed: int = 0):
    torch.manual_seed(seed)
    m1, m2 = (
        da.mlp([64, 16, 16, 10], flatten_input=True),
        da.mlp([64, 16, 16, 10], flatten_input=True),
    )
    spec = da.spec_for_module(m1)
    return m1, spec, m1.state_dict(), m2.state_dict()


def test_sinkhorn_l2_lowers_its_loss_and_returns_a_permutation():
    _, spec, a, b = _pair()
    perm, info = align(a, b, spec, "sinkhorn", steps=80, seed=1)
    hist = info["loss_history"]
    assert info["loss"] == "l2" and len(hist) == 80
    assert hist[-1] < 0.9 * hist[0] and sum(hist[-10:]) < sum(hist[:10])
    assert all(P.is_permutation(p) for p in perm.values())
    assert info["l2"] < info["l2_before"]


def test_sinkhorn_starts_from_init():
    _, spec, a, b = _pair(1)
    start = da.random_permutation(spec, seed=3)
    perm0, _ = align(a, b, spec, "sinkhorn", init=start, steps=0)
    assert _same(perm0, start)
    _, info = align(a, b, spec, "sinkhorn", init=start, steps=5, trajectory_steps=[0, 5])
    (s0, p0), (s5, _) = info["trajectory"]
    assert (s0, s5) == (0, 5) and _same(p0, start)


def test_sinkhorn_from_the_planted_answer_keeps_it():
    model, spec, a, b, planted, _ = _planted("mlp", seed=8)
    perm, _ = align(a, b, spec, "sinkhorn", init=da.invert(planted), steps=40)
    assert _same(perm, da.invert(planted))


def test_sinkhorn_task_loss_runs_on_data_and_is_seeded():
    model, spec, a, b = _pair(2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    p1, info = align(a, b, spec, "sinkhorn", module=model, data=(x, y), steps=15, batch_size=32)
    p2, _ = align(a, b, spec, "sinkhorn", module=model, data=(x, y), steps=15, batch_size=32)
    assert info["loss"] == "task" and len(info["loss_history"]) == 15
    assert _same(p1, p2) and all(P.is_permutation(p) for p in p1.values())


def test_chain_passes_the_first_answer_on():
    model, spec, a, b, planted, _ = _planted("cnn", seed=9)
    perm, info = align(a, b, spec, "wm+sinkhorn", steps=0)
    assert _same(perm, da.invert(planted))
    assert [p["method"] for p in info["parts"]] == ["wm", "sinkhorn"]
    assert info["method"] == "wm+sinkhorn"


# -- registry -----------------------------------------------------------------------------------
def test_identity_method_changes_nothing():
    _, spec, a, b = _pair()
    perm, info = align(a, b, spec, "identity")
    assert _same(perm, da.identity(spec)) and info["l2"] == info["l2_before"]


@pytest.mark.parametrize(
    ("method", "kwargs", "needle"),
    [
        ("am", {}, "needs data"),
        ("wm+am", {}, "needs data"),
        ("nope", {}, "unknown method"),
        ("wm", {"stepz": 3}, "unknown option"),
        ("wm", {"max_sweeps": "7"}, "must be an integer"),
        ("wm+sinkhorn", {"steps": True}, "must be an integer"),
        ("sinkhorn", {"tau": float("inf")}, "must be a number"),
        ("sinkhorn", {"loss": 2}, "must be a string"),
        ("wm+", {}, "empty name"),
    ],
)
def test_bad_requests_are_one_line_errors(method, kwargs, needle):
    _, spec, a, b = _pair()
    with pytest.raises(DeepAlignError) as err:
        align(a, b, spec, method, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_mismatched_state_is_rejected():
    _, spec, a, b = _pair()
    other = da.mlp([64, 17, 16, 10], flatten_input=True).state_dict()
    with pytest.raises(DeepAlignError, match="B"):
        align(a, other, spec, "wm")


def test_deepalign_needs_a_loaded_aligner():
    _, spec, a, b = _pair()
    with pytest.raises(DeepAlignError, match=r"needs a trained aligner"):
        align(a, b, spec, "deepalign")
    with pytest.raises(DeepAlignError, match=r"pass a loaded aligner"):
        align(a, b, spec, "deepalign+wm", aligner="some/folder")
