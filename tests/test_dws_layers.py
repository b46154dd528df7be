"""DWS layers: equivariance to hidden-neuron permutations, sensitivity to uncoupled ones, locality."""

from __future__ import annotations

import itertools

import pytest
import torch

from deepalign.nn.dws import DWSEncoder, DWSLayer, slot_axes
from deepalign.nn.set_layers import pool
from deepalign.nn.weight_space import permute_view

torch.set_num_threads(1)

MLP = (5, 4, 6, 3, 2)  # d_0 .. d_L, L = 4 layers, hidden boundaries 1..3
CNN = (3, 4, 5, 2)  # conv-like: 3 input channels, F = 3 below


def random_slots(widths, cw, cb, batch=2, feats=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = len(widths) - 1
    ws = tuple(torch.randn(batch, widths[i], widths[i + 1], cw, generator=g) for i in range(L))
    bs = tuple(torch.randn(batch, widths[i + 1], cb, generator=g) for i in range(L))
    ops = tuple(torch.randn(batch, widths[i], widths[i + 1], feats, generator=g) for i in range(L))
    return ws, bs, ops


def random_hidden_perms(widths, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        m: torch.argsort(torch.rand(batch, widths[m], generator=g), dim=-1)
        for m in range(1, len(widths) - 1)
    }


def run(layer, ws, bs, ops):
    out = layer([*ws, *bs], ops)
    L = len(ws)
    return tuple(out[:L]), tuple(out[L:])


def close(a, b):
    return all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(a, b, strict=True))


VARIANTS = list(itertools.product(["sab", "deepsets"], ["max", "mean"], [True, False]))


@pytest.mark.parametrize(("set_kind", "pooling", "diagonal"), VARIANTS)
@pytest.mark.parametrize(("widths", "feats"), [(MLP, 1), (CNN, 3)])
def test_layer_is_equivariant(set_kind, pooling, diagonal, widths, feats):
    L = len(widths) - 1
    layer = DWSLayer(
        L,
        (3, 4),
        (4, 8),
        set_layer_kind=set_kind,
        pooling=pooling,
        diagonal=diagonal,
        n_heads=2,
        op_features=feats,
    )
    ws, bs, ops = random_slots(widths, 3, 4, batch=3, feats=feats, seed=1)
    perms = random_hidden_perms(widths, 3, seed=2)
    out_w, out_b = run(layer, ws, bs, ops)
    pw, pb = permute_view(ws, bs, perms)
    pops, _ = permute_view(ops, bs, perms)
    got_w, got_b = run(layer, pw, pb, pops)
    want_w, want_b = permute_view(out_w, out_b, perms)
    assert close(got_w, want_w)
    assert close(got_b, want_b)
    assert not close(got_b, out_b)  # the permutation did something


def _permute_one(tensors, slot, axis_pos, perm):
    """Permute tensor ``slot`` along its axis at position ``axis_pos`` only (an uncoupled action)."""
    out = list(tensors)
    out[slot] = out[slot].index_select(1 + axis_pos, perm)
    return out


@pytest.mark.parametrize("set_kind", ["sab", "deepsets"])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_layer_is_sensitive_to_uncoupled_permutations(set_kind, pooling):
    """Permuting one tensor along a hidden axis but not its neighbours changes every coupled output.

    A layer that processed each tensor on its own (ignoring which neuron of W_l is which neuron of
    b_l and W_{l+1}) would only permute the outputs of that one tensor; this one may not.
    """
    widths = MLP
    L = len(widths) - 1
    axes = slot_axes(L)
    layer = DWSLayer(L, (3, 3), (4, 4), set_layer_kind=set_kind, pooling=pooling, n_heads=2)
    ws, bs, _ = random_slots(widths, 3, 3, seed=3)
    xs = [*ws, *bs]
    base = layer(xs)
    for slot, ax in enumerate(axes):
        for pos, boundary in enumerate(ax):
            if boundary in (0, L):
                continue
            n = widths[boundary]
            perm = torch.roll(torch.arange(n), 1)  # moves every neuron
            moved = layer(_permute_one(xs, slot, pos, perm))
            coupled = [y for y, ay in enumerate(axes) if y != slot and boundary in ay]
            assert coupled
            for y in coupled:
                assert not torch.allclose(moved[y], base[y], atol=1e-5), (slot, boundary, y)
            # and the change is not just that tensor's own outputs being permuted the same way
            expect = _permute_one(base, slot, pos, perm)
            assert not all(
                torch.allclose(a, b, atol=1e-5) for a, b in zip(moved, expect, strict=True)
            )


def test_messages_couple_weights_to_neighbour_neurons():
    """The weight-weighted messages read the input weights as operators on neighbour features."""
    widths = MLP
    L = len(widths) - 1
    layer = DWSLayer(L, (2, 2), (3, 3), n_heads=1, op_features=1)
    ws, bs, ops = random_slots(widths, 2, 2, seed=4)
    base = layer([*ws, *bs], ops)
    perm = torch.roll(torch.arange(widths[2]), 1)
    moved_ops = list(ops)
    moved_ops[1] = ops[1].index_select(2, perm)  # W_1's output neurons only
    moved = layer([*ws, *bs], moved_ops)
    assert not torch.allclose(moved[L + 1], base[L + 1], atol=1e-5)  # b_1: neurons of boundary 2
    assert not torch.allclose(moved[L + 0], base[L + 0], atol=1e-5)  # b_0: via outgoing weights


@pytest.mark.parametrize("diagonal", [True, False])
def test_diagonal_means_neighbouring_layers_only(diagonal):
    """With diagonal blocks, W_0 cannot reach b_2 (boundary 3) in one layer; the full layer can."""
    widths = MLP
    L = len(widths) - 1
    layer = DWSLayer(L, (2, 2), (3, 3), n_heads=1, diagonal=diagonal, op_features=1)
    ws, bs, ops = random_slots(widths, 2, 2, seed=5)
    base = layer([*ws, *bs], ops)
    changed = (ws[0] + 1.0, *ws[1:])
    out = layer([*changed, *bs], ops)
    same = torch.allclose(out[L + 2], base[L + 2])
    assert same == diagonal
    assert not torch.allclose(out[L + 0], base[L + 0])  # b_0 shares boundary 1 with W_0


def test_full_variant_has_more_blocks():
    diag = DWSLayer(4, (2, 2), (2, 2), n_heads=1)
    full = DWSLayer(4, (2, 2), (2, 2), n_heads=1, diagonal=False)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(full) > n(diag)


@pytest.mark.parametrize("widths", [MLP, CNN])
def test_encoder_equivariant_and_sees_input_and_output_positions(widths):
    """Hidden permutations commute with the encoder; pixels and classes are features, not sets."""
    L = len(widths) - 1
    enc = DWSEncoder(
        widths, 2, hidden=8, edge_channels=4, out_features=8, n_layers=2, n_heads=2
    ).eval()
    ws, bs, _ = random_slots(widths, 2, 2, batch=2, seed=6)
    base = enc(ws, bs)
    perms = random_hidden_perms(widths, 2, seed=7)
    pw, pb = permute_view(ws, bs, perms)
    got = enc(pw, pb)
    want = [b.index_select(1, torch.arange(b.shape[1])) for b in base]
    for m, (g, w) in enumerate(zip(got, want, strict=True)):
        idx = perms[m + 1]
        w = torch.gather(w, 1, idx[..., None].expand_as(w))
        assert torch.allclose(g, w, atol=1e-5)
    for boundary in (0, L):  # unpermuted axes: reordering them is not a symmetry
        n = widths[boundary]
        swapped = permute_view(ws, bs, {boundary: torch.roll(torch.arange(n), 1)})
        out = enc(*swapped)
        assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out, base, strict=True))


def test_encoder_all_outputs_are_every_slot():
    enc = DWSEncoder(MLP, 1, hidden=8, edge_channels=4, out_features=6, n_layers=1, outputs="all")
    ws, bs, _ = random_slots(MLP, 1, 1, seed=8)
    out = enc(ws, bs)
    assert [tuple(x.shape) for x in out[:4]] == [(2, MLP[i], MLP[i + 1], 4) for i in range(4)]
    assert [tuple(x.shape) for x in out[4:]] == [(2, MLP[i + 1], 6) for i in range(4)]


@pytest.mark.parametrize("shape", [(3, 5, 7, 4), (2, 33, 17, 3), (4, 1, 6, 2)])
def test_max_pool_matches_amax(shape):
    x = torch.randn(shape)
    for dims in [(1,), (2,), (1, 2)]:
        assert torch.equal(pool(x, dims, "max"), x.amax(dims))
