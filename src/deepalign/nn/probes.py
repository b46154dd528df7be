"""Probe features: each hidden neuron described by what it computes on K learned probe inputs.

Run the aligned networks themselves on a small set of inputs (initialised from real training
examples, then learned with the aligner): a neuron's pre- and post-activation values over the
probes are a description that does not depend on how any layer's neurons are ordered, and that
says what the neuron does rather than how its weights happen to look. A small MLP per hidden layer
turns them into an embedding that joins the DWS encoder's (Prop. 4 of the paper: Deep-Align can
simulate activation matching with learned probes; here the probes are explicit).

The features are permutation-equivariant by construction (a per-neuron map of per-neuron values).
Linear chains only (MLPs, SIRENs): the forward pass runs on the weight-space view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deepalign.errors import DeepAlignError
from deepalign.nn.activations import activation_module
from deepalign.nn.weight_space import ViewSignature, WeightSpaceLayout


def supports_probes(layout: WeightSpaceLayout | ViewSignature) -> bool:
    """Probe features need a chain of linear layers (MLPs, SIRENs) whose activations are known."""
    sig = layout.signature if isinstance(layout, WeightSpaceLayout) else layout
    return sig.activations is not None and all(k == "linear" for k in sig.kinds)


class ProbeFeatures(nn.Module):
    """``(B, n_m, out)`` per hidden layer m from the networks' activations on ``k`` probes.

    Its parameters depend on the input size and the depth, not on the hidden widths."""

    def __init__(
        self, layout: WeightSpaceLayout | ViewSignature, k: int, out: int, hidden: int = 64
    ) -> None:
        super().__init__()
        sig = layout.signature if isinstance(layout, WeightSpaceLayout) else layout
        if not supports_probes(sig):
            raise DeepAlignError(
                "probe features need an MLP or SIREN chain (linear layers only) whose activations "
                "are known; set probes=0"
            )
        assert sig.activations is not None
        self.acts = nn.ModuleList(activation_module(a) for a in sig.activations)
        self.x = nn.Parameter(torch.randn(k, sig.inputs))
        n_hidden = len(sig.kinds) - 1
        self.norms = nn.ModuleList(nn.LayerNorm(2 * k) for _ in range(n_hidden))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * k, hidden), nn.ReLU(), nn.Linear(hidden, out))
            for _ in range(n_hidden)
        )

    @torch.no_grad()
    def init_inputs(self, x: Tensor) -> None:
        """Start the probes at real examples (flattened; the first ``k`` rows of ``x``)."""
        x = x.reshape(x.shape[0], -1)[: self.x.shape[0]]
        if x.shape != self.x.shape:
            raise DeepAlignError(
                f"probe inputs: need {self.x.shape[0]} examples of {self.x.shape[1]} values, "
                f"got {tuple(x.shape)}"
            )
        self.x.copy_(x.to(self.x))

    def forward(self, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> list[Tensor]:
        """Views ``(B, d_in, d_out, F)`` / ``(B, d_out, F)`` (``F`` padding ignored)."""
        h = self.x.unsqueeze(0).expand(weights[0].shape[0], -1, -1)
        out = []
        for m, act in enumerate(self.acts):
            z = torch.einsum("bkd,bdn->bkn", h, weights[m][..., 0]) + biases[m][..., 0].unsqueeze(1)
            h = act(z)
            profile = torch.cat([z, h], dim=1).transpose(1, 2)  # (B, n, 2k)
            out.append(self.mlps[m](self.norms[m](profile)))
        return out
