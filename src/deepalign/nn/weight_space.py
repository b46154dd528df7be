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
from deepalign.core.spec import Concat, PermutationSpec, StateDict
from deepalign.errors import DeepAlignError

View = tuple[tuple[Tensor, ...], tuple[Tensor, ...]]


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
class ViewSignature:
    """What a Deep-Align aligner's parameters depend on: the depth, each layer's kind and feature
    size, the network's input and output sizes, and the activations (when known). Not the hidden
    widths: an aligner runs on networks of any hidden widths with its signature."""

    kinds: tuple[str, ...]
    features: tuple[int, ...]
    inputs: int
    outputs: int
    activations: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kinds": list(self.kinds),
            "features": list(self.features),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "activations": None if self.activations is None else list(self.activations),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "signature") -> ViewSignature:
        try:
            acts = data.get("activations")
            return cls(
                tuple(str(k) for k in data["kinds"]),
                tuple(int(f) for f in data["features"]),
                int(data["inputs"]),
                int(data["outputs"]),
                None if acts is None else tuple(str(a) for a in acts),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DeepAlignError(f"{where}: malformed view signature ({exc})") from None

    def describe(self) -> str:
        """``linear(1) -> linear(1) -> linear(1), 64 inputs, 10 outputs, relu``."""
        layers = " -> ".join(f"{k}({f})" for k, f in zip(self.kinds, self.features, strict=True))
        acts = "" if self.activations is None else ", " + "/".join(self.activations)
        return f"{layers}, {self.inputs} inputs, {self.outputs} outputs{acts}"

    def differences(self, other: ViewSignature) -> list[str]:
        """What really differs, in words (``[]`` when an aligner of one runs on the other)."""
        out = []
        if len(self.kinds) != len(other.kinds):
            out.append(f"depth: {len(self.kinds)} layers vs {len(other.kinds)}")
        elif self.kinds != other.kinds:
            out.append(f"layer kinds: {'-'.join(self.kinds)} vs {'-'.join(other.kinds)}")
        elif self.features != other.features:
            out.append(
                "features per weight (conv kernels, flattened positions): "
                f"{'-'.join(map(str, self.features))} vs {'-'.join(map(str, other.features))}"
            )
        if self.inputs != other.inputs:
            out.append(f"input size: {self.inputs} vs {other.inputs}")
        if self.outputs != other.outputs:
            out.append(f"output size: {self.outputs} vs {other.outputs}")
        if (
            len(self.kinds) == len(other.kinds)
            and self.activations is not None
            and other.activations is not None
            and self.activations != other.activations
        ):
            out.append(
                f"activations: {'/'.join(self.activations)} vs {'/'.join(other.activations)}"
            )
        return out


@dataclass(frozen=True)
class WeightSpaceLayout:
    """How the state dicts of one chain architecture map to and from the weight-space view."""

    layers: tuple[LayerView, ...]
    spec: PermutationSpec
    arch: Mapping[str, Any] | None = None
    activations: tuple[str, ...] | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_spec(
        cls,
        spec: PermutationSpec,
        shapes: Mapping[str, Sequence[int]],
        *,
        arch: Mapping[str, Any] | None = None,
        activations: Sequence[str] | None = None,
    ) -> WeightSpaceLayout:
        """The layout of networks with permutation spec ``spec`` and tensors of ``shapes`` (one
        network's, no batch dim): the chain of Linear/Conv2d weights that the hidden groups link,
        in the order the groups link them, whatever the parameters are called."""
        layers = _chain_layers(spec, {k: tuple(v) for k, v in shapes.items()})
        return cls(tuple(layers), spec, arch, None if activations is None else tuple(activations))

    @classmethod
    def from_module(
        cls, module: nn.Module, example: Tensor | tuple[Tensor, ...] | None = None
    ) -> WeightSpaceLayout:
        """The layout of ``module``: a layer tree of :mod:`deepalign.core.arch` or the user's own
        chain class (traced on ``example``, guessed when its first layer is a Linear)."""
        from deepalign.core.arch import describe
        from deepalign.core.user_model import guess_example, spec_of
        from deepalign.nn.activations import identify_activations

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
                    "weight-space view needs a chain network (MLP, CNN, SIREN); align it with "
                    "wm, am or sinkhorn"
                )
        for name, m in module.named_modules():
            if (
                "Norm" in type(m).__name__
                and any(True for _ in m.parameters(recurse=False))
                or (isinstance(m, nn.modules.batchnorm._NormBase))
            ):
                raise DeepAlignError(
                    f"{name or 'model'}: {type(m).__name__} carries per-neuron parameters that "
                    f"the weight-space view cannot take; {_NORM_HINT}"
                )
        spec = spec_of(module, example)
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        layout = cls.from_spec(spec, shapes)
        try:
            arch = describe(module)
        except DeepAlignError:
            arch = None
        acts = None
        if all(x.kind == "linear" for x in layout.layers):
            probe = example if example is not None else guess_example(module)
            if probe is not None:
                acts = identify_activations(module, [x.weight_key for x in layout.layers], probe)
        return cls(layout.layers, spec, arch, acts)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WeightSpaceLayout:
        """The layout of the architecture described by ``config`` (see :func:`deepalign.core.arch.build`)."""
        from deepalign.core.arch import build
        from deepalign.core.user_model import config_example

        module = build(dict(config))
        return cls.from_module(module, config_example(config, module))

    @property
    def signature(self) -> ViewSignature:
        """What an aligner for these networks depends on (not the hidden widths)."""
        return ViewSignature(
            tuple(x.kind for x in self.layers),
            self.features,
            self.layers[0].d_in,
            self.layers[-1].d_out,
            self.activations,
        )

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return self.widths[1:-1]

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


_NORM_HINT = "align it with wm, am or sinkhorn"


def _chain_layers(spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]]) -> list[LayerView]:
    """The chain's layers from the spec: weights (2-D Linear, 4-D Conv2d) linked input to output
    by the hidden groups; anything else a group acts on is one error naming it."""
    weights: dict[str, tuple[Any, Any]] = {}
    biases: dict[str, str] = {}
    for key, entries in spec.axes.items():
        shape = shapes.get(key)
        if shape is None:
            raise DeepAlignError(f"{key}: in the spec but not among the network's tensors")
        prefix, _, leaf = key.rpartition(".")
        if leaf == "weight" and len(shape) in (2, 4):
            weights[key] = (entries[0], entries[1])
        elif leaf == "bias" and len(shape) == 1:
            biases[prefix] = key
        elif any(e is not None for e in entries):
            raise DeepAlignError(
                f"{key}: {_what(leaf, shape)} carries per-neuron parameters that the weight-space "
                f"view cannot take (Deep-Align takes chain networks: MLP, CNN, SIREN); {_NORM_HINT}"
            )
    for key, (out_e, in_e) in weights.items():
        for e in (out_e, in_e):
            if isinstance(e, Concat) or (e is not None and e.group in spec.heads):
                raise DeepAlignError(
                    f"{key}: fused or head-structured axes (attention) are not in the "
                    f"weight-space view; {_NORM_HINT}"
                )
    starts = [k for k, (_, i) in weights.items() if i is None]
    if len(starts) != 1:
        raise DeepAlignError(
            "the weight-space view needs one input layer and a chain of layers after it; "
            f"found {len(starts)} layers with unpermuted inputs ({', '.join(starts[:3])}); "
            + _NORM_HINT
        )
    by_input: dict[str, list[str]] = {}
    for k, (_, in_e) in weights.items():
        if in_e is not None:
            by_input.setdefault(in_e.group, []).append(k)
    order, key, seen_linear = [], starts[0], False
    while True:
        out_e, in_e = weights[key]
        shape = shapes[key]
        prefix = key.rpartition(".")[0]
        bias = biases.get(prefix)
        if len(shape) == 4:
            if seen_linear:
                raise DeepAlignError(f"{key}: a conv layer after a linear layer is not a chain")
            kernel = tuple(shape[2:])
            kind, d_in, feats = "conv", shape[1], kernel[0] * kernel[1]
        else:
            seen_linear = True
            inner = in_e.inner if in_e is not None else 1
            kind = "folded" if inner > 1 else "linear"
            kernel, feats, d_in = (), inner, shape[1] // inner
        order.append(
            LayerView(
                weight_key=key,
                bias_key=bias,
                kind=kind,
                d_in=d_in,
                d_out=shape[0],
                features=feats,
                kernel=kernel,
                in_group=None if in_e is None else in_e.group,
                out_group=None if out_e is None else out_e.group,
            )
        )
        if out_e is None:
            break
        nxt = by_input.get(out_e.group, [])
        others = [m.key for m in spec.members[out_e.group] if m.key not in (key, bias, *nxt)]
        if len(nxt) != 1 or others:
            what = others[0] if others else (nxt[1] if len(nxt) > 1 else key)
            raise DeepAlignError(
                f"{what}: the neurons of {key.rpartition('.')[0] or key} reach more than the next "
                "layer (a residual addition, a norm or a branch); the weight-space view needs a "
                f"chain network (MLP, CNN, SIREN); {_NORM_HINT}"
            )
        key = nxt[0]
        if key in (x.weight_key for x in order):
            raise DeepAlignError(f"{key}: the layers form a cycle, not a chain")
    if len(order) < 2:
        raise DeepAlignError("the weight-space view needs at least one hidden layer to align")
    left = [k for k in weights if k not in {x.weight_key for x in order}]
    if left:
        raise DeepAlignError(
            f"{left[0]}: a layer outside the chain from {starts[0]} (a branch); {_NORM_HINT}"
        )
    return order


def _what(leaf: str, shape: tuple[int, ...]) -> str:
    if leaf in ("running_mean", "running_var"):
        return "a BatchNorm layer"
    if len(shape) == 1:
        return "a normalisation layer" if leaf in ("weight", "bias") else f"tensor {leaf!r}"
    return f"a {len(shape)}-d tensor"


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
