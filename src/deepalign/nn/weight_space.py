"""The weight-space view: a batch of chain networks as Deep-Align's input layout.

A chain network (MLP, SIREN, or a CNN whose conv stack is flattened into a linear head) with ``L``
parameter layers becomes ``L`` weight tensors ``(B, d_in, d_out, F)`` and ``L`` bias tensors
``(B, d_out, F)``. The axes are the layer boundaries ``0..L`` (``d_0`` network inputs, ``d_L``
outputs, the hidden ones permuted by a spec group each). ``F`` is the per-entry feature size: 1 for
a linear layer, ``k*k`` for a conv kernel, and ``S`` spatial positions for the first linear layer
after the conv stack, folded ``(out, C*S) -> (C, out, S)`` so that the conv channels are its permuted
input axis (the spec's ``AxisPerm.inner == S``). Padded views zero-pad every ``F`` to the largest;
:meth:`WeightSpaceLayout.from_view` is the exact inverse of :meth:`WeightSpaceLayout.to_view`.

The group action of a spec permutation on a state dict is, on the view, a plain index permutation
of the hidden axes (the feature axis never moves), which is what the equivariant layers rely on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deepalign.core.layers import Residual, ViT
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.errors import DeepAlignError

View = tuple[tuple[Tensor, ...], tuple[Tensor, ...]]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


@dataclass(frozen=True)
class LayerView:
    """One parameter layer in the view: its state keys, sizes, feature size and spec groups.

    ``kind`` is ``"linear"``, ``"conv"`` (``F = kh*kw``) or ``"folded"`` (the first linear layer after
    a conv stack, ``F = S`` spatial positions). ``in_group``/``out_group`` are ``None`` for the
    network's (unpermuted) input and output axes. ``has_bias=False`` layers read as zero biases.
    """

    weight_key: str
    bias_key: str | None
    kind: str
    d_in: int
    d_out: int
    features: int
    kernel: tuple[int, ...] = ()
    in_group: str | None = None
    out_group: str | None = None

    @property
    def has_bias(self) -> bool:
        return self.bias_key is not None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the state-dict weight of one network."""
        if self.kind == "conv":
            return (self.d_out, self.d_in, *self.kernel)
        return (self.d_out, self.d_in * self.features)


@dataclass(frozen=True)
class WeightSpaceLayout:
    """How the state dicts of one chain architecture map to and from the weight-space view."""

    layers: tuple[LayerView, ...]
    spec: PermutationSpec
    arch: Mapping[str, Any] | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module) -> WeightSpaceLayout:
        """Derive the layout of ``module`` (a layer tree from :mod:`deepalign.core.arch`)."""
        from deepalign.core.arch import describe
        from deepalign.core.spec_builders import spec_for_module

        for name, m in module.named_modules():
            if isinstance(m, ViT):
                raise DeepAlignError(
                    f"{name or 'model'}: attention heads and residual streams are not in the "
                    "weight-space view (Deep-Align takes chain networks: MLP, CNN, SIREN); align "
                    "transformers with wm, am or sinkhorn"
                )
            if isinstance(m, Residual):
                raise DeepAlignError(
                    f"{name or 'model'}: residual connections tie non-neighbouring layers; the "
                    "weight-space view needs a chain network (MLP, CNN, SIREN)"
                )
        for name, m in module.named_modules():
            where = name or "model"
            if isinstance(m, _NORMS):
                raise DeepAlignError(
                    f"{where}: {type(m).__name__} carries per-neuron parameters that the "
                    "weight-space view cannot represent (use a network without normalisation layers)"
                )
        spec = spec_for_module(module)
        params = [
            (name, m) for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
        ]
        layers = []
        seen_linear = False
        for name, m in params:
            wkey = f"{name}.weight"
            entries = spec.axes[wkey]
            out_e, in_e = entries[0], entries[1]
            bkey = f"{name}.bias" if m.bias is not None else None
            if isinstance(m, nn.Conv2d):
                if seen_linear:
                    raise DeepAlignError(
                        f"{name}: a conv layer after a linear layer is not a chain"
                    )
                if m.groups != 1:
                    raise DeepAlignError(f"{name}: grouped convolutions are not supported")
                kernel = tuple(m.weight.shape[2:])
                feats, kind, d_in = kernel[0] * kernel[1], "conv", m.in_channels
            else:
                seen_linear = True
                inner = in_e.inner if in_e is not None else 1
                kind = "folded" if inner > 1 else "linear"
                kernel, feats, d_in = (), inner, m.in_features // inner
            layers.append(
                LayerView(
                    weight_key=wkey,
                    bias_key=bkey,
                    kind=kind,
                    d_in=d_in,
                    d_out=m.weight.shape[0],
                    features=feats,
                    kernel=kernel,
                    in_group=None if in_e is None else in_e.group,
                    out_group=None if out_e is None else out_e.group,
                )
            )
        _check_chain(layers, spec)
        try:
            arch = describe(module)
        except DeepAlignError:
            arch = None
        return cls(tuple(layers), spec, arch)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WeightSpaceLayout:
        """The layout of the architecture described by ``config`` (see :func:`deepalign.core.arch.build`)."""
        from deepalign.core.arch import build

        return cls.from_module(build(dict(config)))

    # -- sizes --------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> tuple[int, ...]:
        """``(d_0, d_1, ..., d_L)``: the sizes of the layer boundaries (axes of the view)."""
        return (self.layers[0].d_in, *(layer.d_out for layer in self.layers))

    @property
    def hidden_groups(self) -> list[str]:
        """Spec group of each hidden boundary ``1..L-1``; score matrix ``m`` belongs to group ``m``."""
        return [layer.out_group for layer in self.layers[:-1]]  # type: ignore[misc]

    @property
    def features(self) -> tuple[int, ...]:
        """Per-layer feature size ``F``."""
        return tuple(layer.features for layer in self.layers)

    @property
    def max_features(self) -> int:
        return max(self.features)

    def weight_shapes(self, pad: bool = True) -> list[tuple[int, int, int]]:
        """Per-layer ``(d_in, d_out, F)`` of one network's weight view."""
        return [(x.d_in, x.d_out, self.max_features if pad else x.features) for x in self.layers]

    def bias_shapes(self, pad: bool = True) -> list[tuple[int, int]]:
        """Per-layer ``(d_out, F)`` of one network's bias view."""
        return [(x.d_out, self.max_features if pad else 1) for x in self.layers]

    def describe(self) -> list[dict]:
        """One row per layer (for printing)."""
        return [
            {
                "weight": x.weight_key,
                "kind": x.kind,
                "view": f"{x.d_in}x{x.d_out}x{x.features}",
                "groups": f"{x.in_group or 'input'} -> {x.out_group or 'output'}",
            }
            for x in self.layers
        ]

    # -- conversion ---------------------------------------------------------------------------
    def check(self, stacked: Mapping[str, Tensor], where: str = "state dict") -> None:
        """Raise unless ``stacked`` is a batch ``(B, ...)`` of state dicts of this architecture."""
        unbatched = [
            k
            for k, v in stacked.items()
            if k in self.spec.axes and v.dim() == len(self.spec.axes[k])
        ]
        if unbatched:
            raise DeepAlignError(
                f"{where}: {unbatched[0]} has no batch dim; the weight-space view takes stacked "
                "state dicts (deepalign.core.functional.stack_states)"
            )
        self.spec.check(stacked, where, batch_dims=1)
        for x in self.layers:
            shapes = [(x.weight_key, x.weight_shape)]
            if x.bias_key is not None:
                shapes.append((x.bias_key, (x.d_out,)))
            for key, shape in shapes:
                if tuple(stacked[key].shape[1:]) != shape:
                    raise DeepAlignError(
                        f"{where}: {key} has shape {tuple(stacked[key].shape[1:])} per network, "
                        f"the architecture expects {shape}"
                    )
        sizes = {v.shape[0] for v in stacked.values()}
        if len(sizes) != 1:
            raise DeepAlignError(f"{where}: tensors have different batch sizes {sorted(sizes)}")

    def to_view(self, stacked: Mapping[str, Tensor], pad: bool = True) -> View:
        """``(weights, biases)``: per layer ``(B, d_in, d_out, F)`` and ``(B, d_out, F)``.

        ``pad`` zero-pads every ``F`` to :attr:`max_features` (the encoder's input); without it each
        layer keeps its own ``F`` and biases have ``F = 1``.
        """
        self.check(stacked)
        weights, biases = [], []
        for x in self.layers:
            w = stacked[x.weight_key]
            b_size = w.shape[0]
            if x.kind == "conv":
                v = w.flatten(3).transpose(1, 2)  # (B, out, in, k*k) -> (B, in, out, k*k)
            elif x.kind == "folded":
                v = w.reshape(b_size, x.d_out, x.d_in, x.features).transpose(1, 2)
            else:
                v = w.transpose(1, 2).unsqueeze(-1)
            bias = (
                stacked[x.bias_key].unsqueeze(-1)
                if x.bias_key is not None
                else w.new_zeros(b_size, x.d_out, 1)
            )
            if pad:
                v = F.pad(v, (0, self.max_features - v.shape[-1]))
                bias = F.pad(bias, (0, self.max_features - 1))
            weights.append(v.contiguous())
            biases.append(bias.contiguous())
        return tuple(weights), tuple(biases)

    def from_view(self, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> StateDict:
        """The stacked state dict of a (padded or unpadded) view; exact inverse of :meth:`to_view`."""
        if len(weights) != self.n_layers or len(biases) != self.n_layers:
            raise DeepAlignError(
                f"weight-space view has {len(weights)} weights and {len(biases)} biases, "
                f"the architecture has {self.n_layers} layers"
            )
        out: StateDict = {}
        for x, v, b in zip(self.layers, weights, biases, strict=True):
            if v.dim() != 4 or tuple(v.shape[1:3]) != (x.d_in, x.d_out) or v.shape[3] < x.features:
                raise DeepAlignError(
                    f"{x.weight_key}: view of shape {tuple(v.shape)} does not fit "
                    f"(B, {x.d_in}, {x.d_out}, >={x.features})"
                )
            v = v[..., : x.features]
            if x.kind == "conv":
                w = v.transpose(1, 2).reshape(v.shape[0], x.d_out, x.d_in, *x.kernel)
            elif x.kind == "folded":
                w = v.transpose(1, 2).reshape(v.shape[0], x.d_out, x.d_in * x.features)
            else:
                w = v[..., 0].transpose(1, 2)
            out[x.weight_key] = w.contiguous()
            if x.bias_key is not None:
                if b.dim() != 3 or b.shape[1] != x.d_out:
                    raise DeepAlignError(
                        f"{x.bias_key}: view of shape {tuple(b.shape)} does not fit (B, {x.d_out}, F)"
                    )
                out[x.bias_key] = b[..., 0].contiguous()
        return out


def _check_chain(layers: list[LayerView], spec: PermutationSpec) -> None:
    """Every hidden group must link one layer's output to the next layer's input, and nothing else."""
    if len(layers) < 2:
        raise DeepAlignError("the weight-space view needs at least one hidden layer to align")
    if layers[0].in_group is not None or layers[-1].out_group is not None:
        raise DeepAlignError("network inputs and outputs must not be permuted")
    for prev, cur in zip(layers[:-1], layers[1:], strict=True):
        if prev.out_group is None or prev.out_group != cur.in_group:
            raise DeepAlignError(
                f"{cur.weight_key}: its input is not the previous layer's output; the weight-space "
                "view needs a chain network (MLP, CNN, SIREN)"
            )
    keys = {x.weight_key for x in layers} | {x.bias_key for x in layers if x.bias_key}
    extra = [k for k in spec.axes if k not in keys]
    if extra:
        raise DeepAlignError(
            f"{extra[0]}: tensors other than weights and biases are not part of the weight-space view"
        )


def permute_view(
    weights: Sequence[Tensor], biases: Sequence[Tensor], perms: Mapping[int, Tensor]
) -> View:
    """Permute the view's boundary axes: ``perms[m]`` (``(n,)`` or batched ``(B, n)``) reorders boundary m.

    Output index ``i`` of boundary ``m`` holds input index ``perms[m][i]`` — the same convention as
    :func:`deepalign.core.permutation.apply`. Works on feature views of any channel count.
    """

    def along(x: Tensor, dim: int, p: Tensor) -> Tensor:
        if p.dim() == 1:
            return x.index_select(dim, p.to(x.device))
        shape = [p.shape[0]] + [1] * (x.dim() - 1)
        shape[dim] = p.shape[1]
        return torch.gather(x, dim, p.to(x.device).reshape(shape).expand_as(x))

    ws, bs = [], []
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if layer in perms:
            w = along(w, 1, perms[layer])
        if layer + 1 in perms:
            w = along(w, 2, perms[layer + 1])
            b = along(b, 1, perms[layer + 1])
        ws.append(w)
        bs.append(b)
    return tuple(ws), tuple(bs)


def boundary_perms(layout: WeightSpaceLayout, perm: Mapping[str, Tensor]) -> dict[int, Tensor]:
    """A spec permutation as ``{boundary m: indices}`` for :func:`permute_view`."""
    return {m + 1: perm[g] for m, g in enumerate(layout.hidden_groups)}
