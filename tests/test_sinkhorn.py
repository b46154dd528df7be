"""Sinkhorn re-basin, fast and batched: the scaling-vector Sinkhorn equals the log-domain loop (values
and gradients), the solver equals a plain reference loop, a batch of one equals the per-pair solver,
and pairs in a batch do not influence each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import deepalign as da
from deepalign.core import permutation as P
from deepalign.core.functional import stack_states
from deepalign.core.seeds import derive_seed
from deepalign.errors import DeepAlignError
from deepalign.solvers.assignment import linear_assignment, log_sinkhorn
from deepalign.solvers.objective import cost_keys
from deepalign.solvers.sinkhorn import (
    DEFAULT_INIT_SCALE,
    sinkhorn_batch,
    sinkhorn_matrices,
    sinkhorn_rebasin,
)


# -- Sinkhorn on scaling vectors ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "scale", "iters"),
    [
        ((3, 12, 12), 1.0, 20),  # float32 path
        ((2, 4, 7, 7), 3.0, 1),  # extra leading dims, one iteration
        ((5, 9, 9), 3.0, 7),
        ((2, 6, 6), 25.0, 20),  # spread > 30: float64 path
        ((2, 6, 6), 80.0, 20),  # spread > 200: the log-domain loop itself
    ],
)
def test_scaling_sinkhorn_equals_the_log_domain_loop(shape, scale, iters):
    g = torch.Generator().manual_seed(int(scale * 10) + iters)
    x = scale * torch.randn(*shape, generator=g)
    w = torch.randn(*shape, generator=g)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = log_sinkhorn(x1, iters).exp()
    got = sinkhorn_matrices(x2, iters)
    (g1,) = torch.autograd.grad((want * w).sum(), x1)
    (g2,) = torch.autograd.grad((got * w).sum(), x2)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    assert torch.allclose(g2, g1, atol=1e-6 * g1.abs().max().item(), rtol=1e-4)


def test_scaling_sinkhorn_survives_extreme_rows_and_columns():
    """Rows and columns 30 below (or above) the rest: the float32 path's widest accepted spread."""
    x = torch.zeros(2, 8, 8)
    x[0, :, 3] = -30.0
    x[1, 2, :] = 15.0
    x[1, :, 5] = -15.0
    got = sinkhorn_matrices(x, 20)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, log_sinkhorn(x, 20).exp(), atol=1e-6)


# -- the solver against a plain reference loop ----------------------------------------------------
def _models(n_pairs: int, seed: int = 0):
    torch.manual_seed(seed)
    nets = [da.mlp([64, 12, 10, 10], flatten_input=True) for _ in range(2 * n_pairs)]
    spec = da.spec_for_module(nets[0])
    states = [m.state_dict() for m in nets]
    return nets[0], spec, states[:n_pairs], states[n_pairs:]


def _data(n: int = 96):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _reference(
    a, b, spec, *, module=None, data=None, init=None, seed=0, steps=10, batch_size=32,
    loss=None, fixed_batch=False, l2_weight=0.0, lr=0.1,
):  # fmt: skip
    """Sinkhorn re-basin the plain way: one score matrix per group, the log-domain loop per group,
    torch's Adam, the merged state dict rebuilt every step. Randomness as documented: the pair's
    generator draws the score noise group by group, then every step's lam; the data order comes
    from a generator seeded by derive_seed(seed, "sinkhorn-data")."""
    loss = loss or ("task" if data is not None else "l2")
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for g, n in spec.groups.items():
        s = 0.01 * torch.randn(n, n, generator=gen)
        if init is not None:
            s[torch.arange(n), init[g]] += DEFAULT_INIT_SCALE
        scores[g] = s.requires_grad_(True)
    opt = torch.optim.Adam(scores.values(), lr=lr)
    history = []
    if data is not None:
        lams = torch.rand(steps, generator=gen, dtype=torch.float64)
        order_gen = torch.Generator().manual_seed(derive_seed(seed, "sinkhorn-data"))
        x_all, y_all = data
        order, pos = torch.randperm(len(y_all), generator=order_gen), 0
    for step in range(steps):
        mats = {g: log_sinkhorn(s, 20).exp() for g, s in scores.items()}
        soft = P.apply_soft(spec, mats, b)
        if data is None:
            value = sum(((a[k] - soft[k]) ** 2).sum() for k in cost_keys(spec, a))
        else:
            if step == 0 or not fixed_batch:
                if pos >= len(order):
                    order, pos = torch.randperm(len(y_all), generator=order_gen), 0
                idx = order[pos : pos + batch_size]
                pos += batch_size
            lam = float(lams[step])
            merged = {k: (1 - lam) * a[k] + lam * soft[k] for k in a}
            out = functional_call(module, merged, (x_all[idx],))
            if loss == "task":
                value = F.cross_entropy(out, y_all[idx])
            else:
                with torch.no_grad():
                    ends = [functional_call(module, s, (x_all[idx],)) for s in (a, b)]
                value = ((out - ((1 - lam) * ends[0] + lam * ends[1])) ** 2).mean()
            if l2_weight:
                value = value + l2_weight * sum(
                    ((a[k] - soft[k]) ** 2).mean() for k in cost_keys(spec, a)
                )
        opt.zero_grad()
        value.backward()
        opt.step()
        history.append(float(value.detach()))
    return {g: linear_assignment(s.detach()) for g, s in scores.items()}, history


@pytest.mark.parametrize(
    "extra",
    [
        {"loss": "output"},
        {"loss": "task", "fixed_batch": True, "l2_weight": 0.5},
        {"loss": "output", "l2_weight": 2.0},
    ],
)
def test_loss_variants_match_the_plain_reference_loop(extra):
    """Output matching (labels unused), one fixed batch, and an added L2 term."""
    module, spec, (a,), (b,) = _models(1, seed=3)
    kw = dict(
        module=module, data=_data(), init=da.random_permutation(spec, seed=4), seed=11, steps=12
    )
    want_perm, want_hist = _reference(a, b, spec, **kw, **extra)
    perm, info = sinkhorn_rebasin(a, b, spec, batch_size=32, **kw, **extra)
    assert info["loss_history"] == pytest.approx(want_hist, rel=1e-4)
    assert all(torch.equal(perm[g], want_perm[g]) for g in spec.groups)


def test_the_official_codes_settings_are_a_method_of_their_own():
    """``sinkhorn-paper``: a fixed batch of 32, task loss + L2, lr 5e-2 (1,000 steps by default)."""
    from deepalign.solvers import align
    from deepalign.solvers.sinkhorn import PaperSinkhornOptions

    opts = PaperSinkhornOptions()
    assert (opts.steps, opts.lr, opts.batch_size, opts.fixed_batch, opts.l2_weight) == (
        1000, 0.05, 32, True, 1.0,
    )  # fmt: skip
    module, spec, (a,), (b,) = _models(1, seed=3)
    kw = dict(module=module, data=_data(), seed=11)
    perm, info = align(a, b, spec, "sinkhorn-paper", steps=12, **kw)
    want, hist = _reference(
        a, b, spec, **kw, steps=12, loss="task", fixed_batch=True, l2_weight=1.0, lr=0.05
    )
    assert info["loss_history"] == pytest.approx(hist, rel=1e-4)
    assert all(torch.equal(perm[g], want[g]) for g in spec.groups)


@pytest.mark.parametrize("loss", ["l2", "task"])
def test_solver_matches_the_plain_reference_loop(loss):
    module, spec, (a,), (b,) = _models(1, seed=3)
    data = _data() if loss == "task" else None
    init = da.random_permutation(spec, seed=4)
    kw = dict(module=module, data=data, init=init, seed=11, steps=12)
    want_perm, want_hist = _reference(a, b, spec, **kw)
    perm, info = sinkhorn_rebasin(a, b, spec, batch_size=32, **kw)
    assert info["loss"] == loss
    assert info["loss_history"] == pytest.approx(want_hist, rel=1e-4)
    assert all(torch.equal(perm[g], want_perm[g]) for g in spec.groups)


def test_a_batch_of_one_is_the_per_pair_solver():
    module, spec, (a,), (b,) = _models(1, seed=6)
    kw = dict(module=module, data=_data(), seed=2, steps=8, batch_size=32, trajectory_steps=[0, 8])
    perm, info = sinkhorn_rebasin(a, b, spec, **kw)
    bperm, binfo = sinkhorn_batch(stack_states([a]), stack_states([b]), spec, pair_seeds=[2], **kw)
    assert all(torch.equal(bperm[g][0], perm[g]) for g in spec.groups)
    assert binfo["loss_history"][0] == pytest.approx(info["loss_history"], rel=1e-6)
    assert [s for s, _ in binfo["trajectory"]] == [s for s, _ in info["trajectory"]] == [0, 8]


@pytest.mark.parametrize("loss", ["l2", "task"])
def test_pairs_in_a_batch_do_not_influence_each_other(loss):
    """Each pair's answer, losses and trajectory are the same alone as inside a batch of three."""
    module, spec, a_list, b_list = _models(3, seed=9)
    inits = [da.random_permutation(spec, seed=20 + i) for i in range(3)]
    pair_seeds = [101, 7, 55]
    kw = dict(
        module=module,
        data=_data() if loss == "task" else None,
        seed=4,
        steps=10,
        batch_size=32,
        trajectory_steps=[0, 3, 10],
    )
    init = {g: torch.stack([p[g] for p in inits]) for g in spec.groups}
    perm, info = sinkhorn_batch(
        stack_states(a_list), stack_states(b_list), spec, init=init, pair_seeds=pair_seeds, **kw
    )
    assert info["pairs"] == 3 and len(info["loss_history"]) == 3
    assert all(p.shape == (3, spec.groups[g]) for g, p in perm.items())
    assert all(P.is_permutation(p) for p in perm.values())
    for i in range(3):
        alone, ainfo = sinkhorn_batch(
            stack_states([a_list[i]]),
            stack_states([b_list[i]]),
            spec,
            init={g: p[i : i + 1] for g, p in init.items()},
            pair_seeds=[pair_seeds[i]],
            **kw,
        )
        assert all(torch.equal(alone[g][0], perm[g][i]) for g in spec.groups)
        assert info["loss_history"][i] == pytest.approx(ainfo["loss_history"][0], rel=1e-5)
        for (s1, p1), (s2, p2) in zip(info["trajectory"], ainfo["trajectory"], strict=True):
            assert s1 == s2 and all(torch.equal(p1[g][i], p2[g][0]) for g in spec.groups)
        # step 0 of the trajectory is the pair's own start
        assert all(torch.equal(info["trajectory"][0][1][g][i], inits[i][g]) for g in spec.groups)
    # the loss histories differ between pairs (they are not one pair's copies)
    assert info["loss_history"][0] != pytest.approx(info["loss_history"][1], rel=1e-3)


def test_batched_solver_lowers_every_pairs_loss():
    _, spec, a_list, b_list = _models(4, seed=12)
    _, info = sinkhorn_batch(stack_states(a_list), stack_states(b_list), spec, steps=40)
    for hist in info["loss_history"]:
        assert len(hist) == 40 and hist[-1] < 0.95 * hist[0]


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("pairs", "same number of pairs"),
        ("init-shape", "must hold 2 permutations"),
        ("init-groups", "do not match"),
        ("seeds", "pair seeds"),
        ("scores-shape", "must be 2 finite"),
        ("scores-nan", "must be 2 finite"),
        ("scores-groups", "init_scores must map"),
        ("b-shape", "B:"),
        ("tau", "tau > 0"),
        ("noise", "noise >= 0"),
    ],
)
def test_batched_solver_rejects_bad_inputs_in_one_line(case, needle):
    _, spec, a_list, b_list = _models(2, seed=1)
    a, b = stack_states(a_list), stack_states(b_list)
    kw: dict = {"steps": 1}
    if case == "pairs":
        b = {k: v[:1] for k, v in b.items()}
    elif case == "init-shape":
        kw["init"] = {g: torch.arange(n) for g, n in spec.groups.items()}
    elif case == "init-groups":
        kw["init"] = {"nope": torch.arange(3).expand(2, 3)}
    elif case == "seeds":
        kw["pair_seeds"] = [1, 2, 3]
    elif case.startswith("scores"):
        scores = {g: torch.zeros(2, n, n) for g, n in spec.groups.items()}
        g0 = next(iter(scores))
        if case == "scores-shape":
            scores[g0] = scores[g0][:, :-1]
        elif case == "scores-nan":
            scores[g0][1, 0, 0] = float("nan")
        else:
            scores = {"nope": torch.zeros(2, 3, 3)}
        kw["init_scores"] = scores
    elif case == "b-shape":
        b = {k: v[..., :-1] if v.dim() > 2 else v for k, v in b.items()}
    elif case == "tau":
        kw["tau"] = 0.0
    elif case == "noise":
        kw["noise"] = -0.5
    with pytest.raises(DeepAlignError) as err:
        sinkhorn_batch(a, b, spec, **kw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_soft_scores_are_the_start_and_replace_the_hard_prior():
    """With ``init_scores`` the scores start at ``init_scale * init_scores`` (no noise): after
    0 steps the answer is the scores' assignment, even where a hard ``init`` says otherwise."""
    _, spec, a_list, b_list = _models(3, seed=7)
    a, b = stack_states(a_list), stack_states(b_list)
    gen = torch.Generator().manual_seed(0)
    scores = {g: torch.rand(3, n, n, generator=gen) * 2 - 1 for g, n in spec.groups.items()}
    want = {g: linear_assignment(q) for g, q in scores.items()}
    ident = {g: torch.arange(n).expand(3, n).clone() for g, n in spec.groups.items()}
    assert any(not torch.equal(want[g], ident[g]) for g in want)
    perm, _ = sinkhorn_batch(a, b, spec, steps=0, init=ident, init_scores=scores)
    assert all(torch.equal(perm[g], want[g]) for g in want)
    # the per-pair solver takes (n, n) scores and agrees with the batch
    one, _ = sinkhorn_rebasin(
        a_list[1],
        b_list[1],
        spec,
        steps=3,
        seed=5,
        init_scores={g: q[1] for g, q in scores.items()},
    )
    many, _ = sinkhorn_batch(
        {k: v[1:2] for k, v in a.items()},
        {k: v[1:2] for k, v in b.items()},
        spec,
        steps=3,
        seed=5,
        pair_seeds=[5],
        init_scores={g: q[1:2] for g, q in scores.items()},
    )
    assert all(torch.equal(one[g], many[g][0]) for g in one)


def test_a_chain_hands_a_stages_soft_scores_to_sinkhorn():
    """A stage that reports NEXT_SCORES starts the next Sinkhorn from them (not from its hard
    answer); a method without the option just gets the permutation."""
    from deepalign.solvers import align, registry
    from deepalign.solvers.method import NEXT_SCORES, Method

    _, spec, a_list, b_list = _models(1, seed=3)
    gen = torch.Generator().manual_seed(1)
    scores = {g: torch.rand(n, n, generator=gen) for g, n in spec.groups.items()}

    def soft_identity(a, b, spec, *, module=None, data=None, init=None, seed=0):
        perm = {g: torch.arange(n) for g, n in spec.groups.items()}
        return perm, {NEXT_SCORES: scores}

    registry.add(Method("soft_identity_for_test", soft_identity))
    try:
        perm, info = align(a_list[0], b_list[0], spec, "soft_identity_for_test+sinkhorn", steps=0)
        assert all(torch.equal(perm[g], linear_assignment(q)) for g, q in scores.items())
        assert NEXT_SCORES not in info["parts"][0]
        perm, _ = align(a_list[0], b_list[0], spec, "soft_identity_for_test+wm")
        assert set(perm) == set(spec.groups)
    finally:
        registry.METHODS.pop("soft_identity_for_test")
