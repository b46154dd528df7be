"""Check a spec the only way that matters: permuted weights must compute the same function."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from deepalign.core.permutation import Permutation, apply, random_permutation
from deepalign.core.spec import PermutationSpec


def permuted_module(module: nn.Module, spec: PermutationSpec, perm: Permutation) -> nn.Module:
    """A copy of ``module`` whose state dict is permuted by ``perm``."""
    out = copy.deepcopy(module)
    out.load_state_dict(apply(spec, perm, module.state_dict()))
    return out


@torch.no_grad()
def verify(module: nn.Module, spec: PermutationSpec, example_input: Tensor, seed: int = 0) -> float:
    """Largest absolute output difference after a random permutation of every group (eval mode).

    A correct spec gives float round-off (~1e-6 in float32); a wrong one gives O(1).
    """
    spec.check(module.state_dict(), where="verify")
    was_training = module.training
    module.eval()
    try:
        ref = module(example_input)
        moved = permuted_module(module, spec, random_permutation(spec, seed=seed)).eval()
        return float((moved(example_input) - ref).abs().max())
    finally:
        module.train(was_training)
