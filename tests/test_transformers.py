"""Transformers: attention heads in specs, the function kept, planted heads recovered, merging."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import deepalign as da
from conftest import recovers_planted
from deepalign.core import permutation as P
from deepalign.core.spec import AxisPerm, Concat, PermutationSpec
from deepalign.errors import DeepAlignError
from deepalign.solvers import align
from deepalign.solvers.assignment import block_assignment
from deepalign.solvers.sinkhorn import head_matrices, sinkhorn_matrices
from transformer_models import (
    CausalSelfAttention,
    CrossDims,
    EinsumAttention,
    RawPatches,
    Seq2Seq,
    TimmStyleViT,
    TinyGPT,
    TinyViT,
    Translator,
    UnfoldViT,
)

HERE = Path(__file__).parent

CASES = {
    "vit-prenorm": (lambda: TinyViT(), lambda g: torch.rand(4, 1, 8, 8, generator=g)),
    "vit-postnorm-seq-first": (
        lambda: TinyViT(norm_first=False, batch_first=False),
        lambda g: torch.rand(4, 1, 8, 8, generator=g),
    ),
    "vit-unfold-patches": (lambda: UnfoldViT(), lambda g: torch.rand(4, 1, 8, 8, generator=g)),
    "gpt-explicit-softmax": (
        lambda: TinyGPT(),
        lambda g: torch.randint(0, 20, (3, 8), generator=g),
    ),
    "gpt-sdpa-untied": (
        lambda: TinyGPT(fused=True, tied=False),
        lambda g: torch.randint(0, 20, (3, 8), generator=g),
    ),
    "seq2seq-decoder": (
        lambda: Seq2Seq(),
        lambda g: (torch.randn(6, 3, 5, generator=g), torch.randn(4, 3, 3, generator=g)),
    ),
    "mha-kdim-vdim": (lambda: CrossDims(), lambda g: torch.randn(3, 5, 4, generator=g)),
    "raw-patches-unfold": (lambda: RawPatches(), lambda g: torch.randn(3, 1, 8, 8, generator=g)),
    "vit-timm-qkv-reshape": (lambda: TimmStyleViT(), lambda g: torch.rand(3, 1, 8, 8, generator=g)),
    "einsum-attention": (lambda: EinsumAttention(), lambda g: torch.randn(2, 6, 5, generator=g)),
    "torch-transformer": (
        lambda: Translator(),
        lambda g: (torch.randn(2, 5, 3, generator=g), torch.randn(2, 4, 2, generator=g)),
    ),
}
# heads per attention layer of each case
HEADS = {
    "vit-prenorm": [4, 4],
    "vit-postnorm-seq-first": [4, 4],
    "vit-unfold-patches": [3, 3],
    "gpt-explicit-softmax": [4, 4],
    "gpt-sdpa-untied": [4, 4],
    "seq2seq-decoder": [2, 2, 2],
    "mha-kdim-vdim": [2],
    "raw-patches-unfold": [2],
    "vit-timm-qkv-reshape": [4],
    "torch-transformer": [2, 2, 2],
    "einsum-attention": [4],
}


def _run(m, x):
    return m(*x) if isinstance(x, tuple) else m(x)


def _case(name: str, seed: int = 0):
    make, inputs = CASES[name]
    torch.manual_seed(seed)
    m = make().eval()
    g = torch.Generator().manual_seed(seed)
    return m, inputs(g)


@pytest.mark.parametrize("name", sorted(CASES))
def test_permuted_transformers_compute_the_same_function(name: str) -> None:
    m, x = _case(name)
    spec = da.spec_from_model(m, x)
    heads = [spec.groups[h] for h in spec.ties()]
    assert heads == HEADS[name]
    for g, h in spec.heads.items():  # every structured group: whole heads of equal size
        assert spec.groups[g] == spec.groups[h] * spec.head_size(g) and spec.head_size(g) > 1
    with torch.no_grad():
        ref = _run(m, x)
        for seed in range(3):
            perm = da.random_permutation(spec, seed=seed)
            P.check_structure(spec, perm)
            moved = da.permuted_module(m, spec, perm).eval()
            out = _run(moved, x)
            # float32 sums of O(1) terms, reordered: a few ulps of the largest magnitudes
            assert float((out - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
            assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())


def test_torch_attention_layout_queries_keys_values_and_the_residual_stream() -> None:
    m, x = _case("vit-prenorm")
    spec = da.spec_from_model(m, x)
    pre = "encoder.layers.0.self_attn"
    qk, v, heads = f"{pre}.qk", f"{pre}.v", f"{pre}.heads"
    assert spec.heads[qk] == spec.heads[v] == heads and spec.groups[heads] == 4
    res = spec.axes["cls"][2].group  # the residual stream: one group through the whole network
    assert spec.axes[f"{pre}.in_proj_weight"] == (
        Concat(((AxisPerm(qk), 16), (AxisPerm(qk), 16), (AxisPerm(v), 16))),
        AxisPerm(res),
    )
    assert spec.axes[f"{pre}.out_proj.weight"] == (AxisPerm(res), AxisPerm(v))
    for key in ("pos", "patch.weight", "norm.weight", "encoder.layers.1.norm2.bias"):
        assert res in {e.group for e in spec.axes[key] if isinstance(e, AxisPerm)}
    assert spec.axes["head.weight"] == (None, AxisPerm(res))
    assert PermutationSpec.from_json(spec.to_json()) == spec
    rows = {r["group"]: r for r in spec.describe()}
    assert rows[qk]["heads"].startswith("4 x 4") and qk in rows[heads]["orders heads of"]


def test_hand_written_attention_gets_the_same_groups() -> None:
    m, x = _case("gpt-explicit-softmax")
    spec = da.spec_from_model(m, x)
    qkv = spec.axes["blocks.0.attn.qkv.weight"][0]
    (q, nq), (k, nk), (v, nv) = qkv.parts
    assert q == k != v and nq == nk == nv == 16
    assert spec.heads[q.group] == spec.heads[v.group]
    assert spec.axes["blocks.0.attn.proj.weight"][1] == v
    assert spec.axes["blocks.0.attn.mask"] == (None, None, None, None)  # a buffer of positions
    assert spec.axes["wte.weight"] == spec.axes["lm_head.weight"]  # tied: moved together
    assert spec.axes["wte.weight"][0] is None  # the vocabulary is never permuted


def test_structure_is_checked() -> None:
    m, x = _case("vit-prenorm")
    spec = da.spec_from_model(m, x)
    perm = da.random_permutation(spec, seed=1)
    g = next(iter(spec.heads))
    broken = dict(perm)
    broken[g] = torch.randperm(spec.groups[g], generator=torch.Generator().manual_seed(5))
    with pytest.raises(DeepAlignError, match="does not move whole heads"):
        P.check_structure(spec, broken)
    shuffled = dict(perm)
    h = spec.heads[g]
    shuffled[h] = perm[h].roll(1)
    with pytest.raises(DeepAlignError, match="does not follow its head order"):
        P.check_structure(spec, shuffled)


@pytest.mark.parametrize("name", sorted(CASES))
def test_weight_matching_recovers_planted_heads_exactly(name: str) -> None:
    m, x = _case(name, seed=1)
    spec = da.spec_from_model(m, x)
    planted = da.random_permutation(spec, seed=7)
    assert any(not torch.equal(planted[h], torch.arange(spec.groups[h])) for h in spec.ties())
    assert recovers_planted(spec, m.state_dict(), "wm", seed=7)[0]


@pytest.mark.parametrize("name", ["gpt-sdpa-untied", "vit-prenorm"])
def test_activation_matching_and_sinkhorn_recover_planted_heads(name: str) -> None:
    m, x = _case(name, seed=2)
    spec = da.spec_from_model(m, x)
    a = m.state_dict()
    g = torch.Generator().manual_seed(0)
    data = torch.cat([CASES[name][1](g) for _ in range(16)])
    ok, info = recovers_planted(spec, a, "am", seed=3, module=m, data=(data, None))
    assert ok
    # every group is seen by activations: hand-written ops through the graph, torch's own
    # attention and transformer layers through their query/value projections and MLP units
    assert info.get("wm_groups", []) == []
    assert set(info["mean_correlation"]) == set(spec.groups) - set(spec.ties())
    assert recovers_planted(spec, a, "sinkhorn", seed=3, loss="l2", steps=150)[0]


def test_block_assignment_is_the_best_structured_permutation() -> None:
    """Brute force over every head order and within-head permutations (H = 3, d = 2)."""
    gen = torch.Generator().manual_seed(0)
    h, d = 3, 2
    costs = [torch.randn(h * d, h * d, generator=gen, dtype=torch.float64) for _ in range(2)]
    head_cost = torch.randn(h, h, generator=gen, dtype=torch.float64)
    order, perms, value = block_assignment(costs, h, head_cost)
    best = -float("inf")
    withins = list(itertools.permutations(range(d)))
    for sigma in itertools.permutations(range(h)):
        s = torch.tensor(sigma)
        total = float(head_cost[torch.arange(h), s].sum())
        for c in costs:  # the within-head choices are independent per head and per group
            for i in range(h):
                blk = c[i * d : (i + 1) * d, sigma[i] * d : (sigma[i] + 1) * d]
                total += max(float(blk[torch.arange(d), torch.tensor(w)].sum()) for w in withins)
        best = max(best, total)
    assert value == pytest.approx(best, rel=1e-9)
    got = float(head_cost[torch.arange(h), order].sum()) + sum(
        float(c[torch.arange(h * d), p].sum()) for c, p in zip(costs, perms, strict=True)
    )
    assert got == pytest.approx(best, rel=1e-9)
    for p in perms:
        assert torch.equal(P.split_blocks(p, h)[0], order)


def test_head_matrices_are_doubly_stochastic_and_hard_when_their_parts_are() -> None:
    gen = torch.Generator().manual_seed(0)
    h, d = 3, 4
    heads = sinkhorn_matrices(torch.randn(2, h, h, generator=gen), 50)
    soft = head_matrices(torch.randn(2, h * d, h * d, generator=gen), heads, 1.0, 50)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2, h * d), atol=1e-4, rtol=0)
    torch.testing.assert_close(soft.sum(-2), torch.ones(2, h * d), atol=1e-4, rtol=0)
    order, within = torch.tensor([2, 0, 1]), torch.stack([torch.randperm(d) for _ in range(h)])
    want = P.block_permutation(order, within)
    big = torch.full((h * d, h * d), -60.0)
    big[torch.arange(h * d), want] = 60.0
    hard = head_matrices(big, torch.eye(h)[order], 1.0, 5)
    torch.testing.assert_close(hard, P.to_matrices({"g": want})["g"], atol=1e-6, rtol=0)


def test_unsupported_attention_forms_are_one_line_errors() -> None:
    class Rotary(CausalSelfAttention):
        def forward(self, x):  # rotary-style: rotate half of every head's dimensions
            q = self.qkv(x)[..., :16]
            rot = torch.cat([-q[..., 8:], q[..., :8]], dim=-1)
            return self.proj(torch.roll(rot, 1, dims=-1))

    with pytest.raises(DeepAlignError, match=r"torch\.roll") as info:
        da.spec_from_model(Rotary(16, 4, 8), torch.randn(2, 8, 16))
    assert "\n" not in str(info.value)

    class PerHeadMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.register_buffer("mask", torch.zeros(6, 5, 5))  # (batch * heads, L, S)

        def forward(self, x):
            return self.attn(x, x, x, attn_mask=self.mask)[0]

    with pytest.raises(DeepAlignError, match="per-head"):
        da.spec_from_model(PerHeadMask(), torch.randn(3, 5, 8))


# -- two trained ViTs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vits():
    from deepalign.data import load

    tr, te = load("digits", "train", normalize=False), load("digits", "test", normalize=False)
    x, y = tr.x.view(-1, 1, 8, 8), tr.y
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = TinyViT(dim=32, heads=4)
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        for _ in range(300):
            idx = torch.randint(0, x.shape[0], (64,))
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        nets.append(m.eval())
    return nets, (x, y, te.x.view(-1, 1, 8, 8), te.y)


def test_two_trained_vits_merge_better_aligned_than_averaged(vits) -> None:
    (a, b), (x, y, xt, yt) = vits
    ex = xt[:2]
    losses = {}
    for method in ("identity", "am", "sinkhorn"):
        opts = {"steps": 100} if method == "sinkhorn" else {}
        merged = da.merge_models(a, b, method=method, example_input=ex, data=(x, y), **opts)
        with torch.no_grad():
            losses[method] = float(F.cross_entropy(merged(xt), yt))
    for method in ("wm", "am", "sinkhorn"):
        opts = {"steps": 5} if method == "sinkhorn" else {}
        aligned, _ = da.align_models(a, b, method=method, example_input=ex, data=(x, y), **opts)
        with torch.no_grad():
            torch.testing.assert_close(aligned(xt), b(xt), atol=1e-4, rtol=1e-4)
    # midpoint losses of such pairs (docs/results.md): averaging ~2.4, Sinkhorn ~1.2, am ~1.7
    assert losses["sinkhorn"] < losses["identity"] - 0.3
    assert losses["am"] < losses["identity"]


def test_cli_aligns_the_users_transformer(cli, vits, tmp_path) -> None:
    (a, b), (_, _, xt, _) = vits
    shutil.copy(HERE / "transformer_models.py", tmp_path / "transformer_models.py")
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    model = f"{tmp_path / 'transformer_models.py'}:TinyViT"
    common = ["--model", model, "--model-args", '{"dim": 32}', "--input-shape", "1,8,8"]
    res = cli("align", tmp_path / "a.pt", tmp_path / "b.pt", *common, "--out", tmp_path / "c.pt")
    assert res.code == 0, res.err
    mine = TinyViT(dim=32).eval()
    mine.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(mine(xt), b(xt), atol=1e-4, rtol=1e-4)
    res = cli("inspect", tmp_path / "a.pt", *common)
    assert res.code == 0 and "heads" in res.out, res.err


def test_cli_on_a_language_model_traces_token_inputs(cli, tmp_path) -> None:
    """--input-shape of a model that starts with an Embedding is a number of tokens."""
    shutil.copy(HERE / "transformer_models.py", tmp_path / "transformer_models.py")
    torch.manual_seed(0)
    gpt = TinyGPT().eval()
    torch.save(gpt.state_dict(), tmp_path / "a.pt")
    common = ["--model", f"{tmp_path / 'transformer_models.py'}:TinyGPT", "--input-shape", "8"]
    res = cli("permute", tmp_path / "a.pt", *common, "--seed", "3", "--out", tmp_path / "b.pt")
    assert res.code == 0, res.err
    res = cli("align", tmp_path / "a.pt", tmp_path / "b.pt", *common, "--out", tmp_path / "c.pt")
    assert res.code == 0, res.err
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    moved = torch.load(tmp_path / "b.pt", weights_only=True)
    assert any(not torch.equal(moved[k], v) for k, v in gpt.state_dict().items())
    for k, v in gpt.state_dict().items():  # the planted permutation, heads included, undone
        assert torch.equal(back[k], v), k


class _ReadBackSwapped(torch.nn.Module):
    """Units viewed as (3, 4), then read back as (4, 3): not a head structure."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 12), torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).view(-1, 3, 4).transpose(1, 2).reshape(-1, 12))


class _PerHeadSum(torch.nn.Module):
    """A sum inside every head: any permutation within a head, and any order of heads, keep it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 12), torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).view(-1, 3, 4).sum(-1))


class _SharedScale(torch.nn.Module):
    """One scale per head dimension, shared by all heads: only whole heads may move."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 12), torch.nn.Linear(12, 3)
        self.scale = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.relu(self.a(x)).view(-1, 3, 4) * self.scale
        return self.b(h.reshape(-1, 12))


def test_head_views_that_do_not_hold_fall_back_safely() -> None:
    x = torch.randn(6, 5)
    swapped = da.spec_from_model(_ReadBackSwapped(), x)
    assert swapped.groups == {}  # never guessed
    per_head = da.spec_from_model(_PerHeadSum(), x)
    assert per_head.heads == {"a.out": "a.out.heads"} and per_head.groups["a.out.heads"] == 3
    shared = da.spec_from_model(_SharedScale(), x)
    assert shared.heads == {} and shared.axes["a.weight"][0] == AxisPerm("a.out", 4)
    assert shared.axes["scale"] == (None,)
    for m, spec in (
        (_ReadBackSwapped(), swapped),
        (_PerHeadSum(), per_head),
        (_SharedScale(), shared),
    ):
        for seed in range(4):
            assert da.verify(m, spec, x, seed=seed) < 1e-5


def test_lmc_and_sinkhorn_task_loss_on_token_sequences() -> None:
    """Next-token data: logits (batch, positions, vocab) against labels (batch, positions)."""
    from deepalign.lmc.curves import lmc_curve

    torch.manual_seed(0)
    a, b = TinyGPT().eval(), TinyGPT().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 20, (32, 8), generator=g), torch.randint(0, 20, (32, 8), generator=g)
    curve = lmc_curve(a, a.state_dict(), b.state_dict(), (x, y), points=3)
    with torch.no_grad():
        want = F.cross_entropy(a(x).reshape(-1, 20), y.reshape(-1))
        hits = (a(x).argmax(-1) == y).float().mean()
    assert float(curve["loss"][0]) == pytest.approx(float(want), rel=1e-5)
    assert float(curve["accuracy"][0]) == pytest.approx(float(hits), rel=1e-5)
    spec = da.spec_from_model(a, x[:2])
    perm, info = align(
        a.state_dict(), b.state_dict(), spec, "sinkhorn", module=a, data=(x, y), steps=3
    )
    assert info["loss"] == "task" and len(info["loss_history"]) == 3
    P.check_structure(spec, perm)


@settings(max_examples=10, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.integers(2, 4),
    depth=st.integers(1, 2),
    norm_first=st.booleans(),
    batch_first=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_random_torch_vits_keep_their_function_and_give_back_planted_heads(
    heads, head_dim, depth, norm_first, batch_first, seed
) -> None:
    torch.manual_seed(seed)
    m = TinyViT(
        dim=heads * head_dim,
        heads=heads,
        depth=depth,
        norm_first=norm_first,
        batch_first=batch_first,
    ).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    spec = da.spec_from_model(m, x)
    assert [spec.groups[h] for h in spec.ties()] == [heads] * depth
    assert da.verify(m, spec, x, seed=seed) < 1e-4
    assert recovers_planted(spec, m.state_dict(), "wm", seed=seed)[0]


def test_activation_matching_reads_a_residual_stream_at_every_layer() -> None:
    """With ``streams``, a group no nonlinearity sees (the residual stream) is observed at every op
    that computes it (views of the same values skipped), each standardised."""
    from deepalign.core.trace import trace_model

    m, x = _case("gpt-explicit-softmax")
    traced = trace_model(m, x)
    res = traced.spec.axes["wpe.weight"][1].group
    nodes = [n for n, _ in traced.streams[res]]
    adds = [n for n in nodes if n.startswith("add")]
    assert len(adds) >= 1 + 2 * 2  # the embeddings' sum and two residual adds per block
    assert not any(n.startswith(("view", "transpose", "getitem")) for n in nodes)
    one = traced.activations(m, m.state_dict(), x)  # the default: the first op only
    assert one[res].shape == (x.numel(), traced.spec.groups[res])
    seen = traced.activations(m, m.state_dict(), x, streams=True)
    samples = x.numel()  # batch x positions per node (the position embedding alone: positions)
    assert seen[res].shape[1] == traced.spec.groups[res]
    assert seen[res].shape[0] >= samples * (len(nodes) - 1)
    block = seen[res][-samples:]  # the last node's samples: standardised per unit
    torch.testing.assert_close(block.mean(0), torch.zeros(block.shape[1]), atol=1e-5, rtol=0)
    data = torch.randint(0, 20, (64, 8), generator=torch.Generator().manual_seed(0))
    options = {"module": m, "data": (data, None), "streams": True}
    assert recovers_planted(traced.spec, m.state_dict(), "am", seed=2, **options)[0]


def test_cli_lmc_and_merge_on_next_token_data(cli, tmp_path) -> None:
    """--data FILE.pt with token inputs (integers, kept so) and one label per position."""
    shutil.copy(HERE / "transformer_models.py", tmp_path / "transformer_models.py")
    torch.manual_seed(0)
    for name in ("a", "b"):
        torch.save(TinyGPT().state_dict(), tmp_path / f"{name}.pt")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (48, 8), generator=g)
    torch.save({"x": x, "y": x.roll(-1, dims=1)}, tmp_path / "text.pt")
    torch.save({"x": x, "y": x[:, :3]}, tmp_path / "bad.pt")
    common = ["--model", f"{tmp_path / 'transformer_models.py'}:TinyGPT", "--input-shape", "8"]
    res = cli(
        "lmc", tmp_path / "a.pt", tmp_path / "b.pt", *common,
        "--data", tmp_path / "text.pt", "--method", "wm", "--json", tmp_path / "lmc.json",
    )  # fmt: skip
    assert res.code == 0, res.err
    import json

    curve = json.loads((tmp_path / "lmc.json").read_text())
    assert len(curve["lambdas"]) == 25 and curve["method"] == "wm"
    res = cli(
        "merge", tmp_path / "a.pt", tmp_path / "b.pt", *common,
        "--data", tmp_path / "bad.pt", "--method", "am", "--out", tmp_path / "m.pt",
    )  # fmt: skip
    assert res.code == 2 and "one per position" in res.err and not (tmp_path / "m.pt").exists()
