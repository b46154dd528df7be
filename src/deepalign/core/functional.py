"""Run one architecture with many weight sets at once (``torch.func.functional_call`` + ``vmap``).

Zoo training, LMC curves over many pairs and Deep-Align's task loss all evaluate N networks of one
architecture on data; this is the one place that does it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap


def stack_states(states: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack state dicts of one architecture along a new leading dim."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def unstack_state(stacked: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """The ``i``-th state dict of a stack."""
    return {k: v[i] for k, v in stacked.items()}


def untied(module: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` without the second names of tied weights (``functional_call`` takes one name per
    tensor; a spec moves tied names alike, so the values agree)."""
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    every = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in tensors.items() if k in names or k not in every}


def batched_forward(
    module: nn.Module, stacked: Mapping[str, Tensor], x: Tensor, shared_input: bool = True
) -> Tensor:
    """Outputs of N networks: ``stacked`` tensors have a leading N; returns ``(N, batch, ...)``.

    ``x`` is one batch for all networks (``shared_input``) or one batch per network ``(N, batch, ...)``.
    The module's mode (train/eval) decides BatchNorm behaviour; buffers in ``stacked`` are read, not
    updated.
    """
    params = untied(module, stacked)

    def one(p: dict[str, Tensor], inp: Tensor) -> Tensor:
        return functional_call(module, p, (inp,))

    in_dims = (0, None) if shared_input else (0, 0)
    return vmap(one, in_dims=in_dims, randomness="different")(params, x)
