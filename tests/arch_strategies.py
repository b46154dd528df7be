"""Hypothesis strategies: small random networks from every builder, with a matching input batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from hypothesis import strategies as st
from torch import nn

import deepalign as da
from deepalign.core.arch import _ACTIVATIONS

ACTS = sorted(_ACTIVATIONS)


@dataclass
class Case:
    """A model (eval mode, trained-looking BatchNorm stats) and an input batch it accepts.

    Built lazily, inside the test, from its own seed: strategies must not touch torch's global RNG.
    """

    name: str
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    seed: int

    @cached_property
    def model(self) -> nn.Module:
        from conftest import randomize_bn_stats

        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = self.factory()
        randomize_bn_stats(model, seed=self.seed)
        return model.eval()

    @cached_property
    def x(self) -> torch.Tensor:
        return torch.randn(5, *self.shape, generator=torch.Generator().manual_seed(self.seed))

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return f"Case({self.name}, input {self.shape}, seed {self.seed})"


@st.composite
def mlps(draw) -> Case:
    widths = draw(st.lists(st.integers(1, 7), min_size=3, max_size=5))
    act = draw(st.sampled_from(ACTS))
    norm = draw(st.sampled_from([None, "batchnorm", "layernorm"]))
    flat = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    if flat:  # images of shape (1, 2, w0/2) flattened by the model itself
        widths[0] = 2 * max(1, widths[0] // 2)
        shape = (1, 2, widths[0] // 2)
    else:
        shape = (widths[0],)
    model = lambda: da.mlp(widths, act=act, norm=norm, flatten_input=flat)  # noqa: E731
    return Case(f"mlp {widths} {act} {norm} flat={flat}", model, shape, seed)


@st.composite
def cnns(draw) -> Case:
    c_in = draw(st.integers(1, 3))
    channels = draw(st.lists(st.sampled_from([1, 3, 5, 7]), min_size=1, max_size=3))
    size = draw(st.integers(3, 8))
    pool_every = draw(st.integers(1, 2))
    act = draw(st.sampled_from(ACTS))
    bn = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    model = lambda: da.cnn(c_in, channels, 3, size, pool_every=pool_every, act=act, batchnorm=bn)  # noqa: E731
    name = f"cnn in={c_in} {channels} size={size} pool_every={pool_every} {act} bn={bn}"
    return Case(name, model, (c_in, size, size), seed)


@st.composite
def resnets(draw) -> Case:
    c_in = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(2, 5), min_size=1, max_size=3))
    blocks = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    model = lambda: da.resnet(c_in, widths, 3, blocks_per_stage=blocks)  # noqa: E731
    return Case(f"resnet in={c_in} {widths} blocks={blocks}", model, (c_in, 4, 4), seed)


@st.composite
def sirens(draw) -> Case:
    widths = draw(st.lists(st.integers(1, 8), min_size=3, max_size=5))
    widths[0] = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    w0 = draw(st.sampled_from([1.0, 30.0]))
    model = lambda: da.siren(widths, w0=w0)  # noqa: E731
    return Case(f"siren {widths} w0={w0}", model, (widths[0],), seed)


BUILDERS = {"mlp": mlps(), "cnn": cnns(), "resnet": resnets(), "siren": sirens()}
