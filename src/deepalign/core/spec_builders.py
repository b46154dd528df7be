"""Hand-written spec rules for the layer trees in :mod:`deepalign.core.arch`.

Walks an ``nn.Sequential`` / :class:`Residual` tree in order, opening one group per hidden
Linear/Conv output, carrying it through norms, activations and pooling, mapping it onto blocks of a
linear layer's input after ``Flatten``, and making both branches of a residual block share a group.
The tracer (:mod:`deepalign.core.trace`) derives the same specs from any traceable module.
"""

from __future__ import annotations

from torch import nn

from deepalign.core.layers import Residual, ViT
from deepalign.core.spec import AxisPerm, PermutationSpec
from deepalign.errors import DeepAlignError

_PARAM_LAYERS = (nn.Linear, nn.Conv2d)
_PASS_THROUGH = (
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)


def _param_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, _PARAM_LAYERS)]


class _Walker:
    def __init__(self) -> None:
        self.groups: dict[str, int] = {}
        self.axes: dict[str, tuple[AxisPerm | None, ...]] = {}
        self.flattened = False
        self.probes: dict[str, str] = {}

    def new_group(self, size: int) -> AxisPerm:
        name = f"P{len(self.groups)}"
        self.groups[name] = size
        return AxisPerm(name)

    def walk(
        self, m: nn.Module, prefix: str, cur: AxisPerm | None, force: dict[int, AxisPerm | None]
    ) -> AxisPerm | None:
        from deepalign.core.layers import Sine

        if isinstance(m, nn.Sequential):
            for name, child in m.named_children():
                cur = self.walk(child, f"{prefix}{name}.", cur, force)
            return cur
        if isinstance(m, Residual):
            if isinstance(m.shortcut, nn.Identity):
                out = cur
            else:
                last = _param_layers(m.shortcut)[-1]
                out = self.new_group(
                    last.out_features if isinstance(last, nn.Linear) else last.out_channels
                )
                self.walk(m.shortcut, f"{prefix}shortcut.", cur, {**force, id(last): out})
            body_last = _param_layers(m.body)[-1]
            self.walk(m.body, f"{prefix}body.", cur, {**force, id(body_last): out})
            return out
        if isinstance(m, _PARAM_LAYERS):
            fan_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            fan_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            inp = cur
            if cur is not None and self.flattened:
                size = self.groups[cur.group]
                if fan_in % size:
                    raise DeepAlignError(
                        f"{prefix}weight: {fan_in} inputs after Flatten do not split into {size} channels"
                    )
                inp = AxisPerm(cur.group, fan_in // size)
            self.flattened = False
            out = force[id(m)] if id(m) in force else self.new_group(fan_out)
            extra = (None,) * (m.weight.dim() - 2)
            self.axes[f"{prefix}weight"] = (out, inp, *extra)
            if m.bias is not None:
                self.axes[f"{prefix}bias"] = (out,)
            return out
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, name, None) is not None:
                    self.axes[f"{prefix}{name}"] = (cur,)
            if m.num_batches_tracked is not None:
                self.axes[f"{prefix}num_batches_tracked"] = ()
            return cur
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                raise DeepAlignError(
                    f"{prefix.rstrip('.')}: LayerNorm over more than the feature axis is not supported"
                )
            for name in ("weight", "bias"):
                if getattr(m, name, None) is not None:
                    self.axes[f"{prefix}{name}"] = (cur,)
            return cur
        if isinstance(m, nn.Flatten):
            self.flattened = True
            return cur
        if isinstance(m, (*_PASS_THROUGH, Sine)):
            if cur is not None and not self.flattened:
                self.probes[cur.group] = prefix.rstrip(".")
            return cur
        raise DeepAlignError(
            f"{prefix.rstrip('.') or 'model'}: no hand rule for layer {type(m).__name__}; "
            "trace it instead: deepalign.spec_from_model(module, example_input)"
        )


def _walk(module: nn.Module) -> _Walker:
    params = _param_layers(module)
    if not params:
        raise DeepAlignError("model has no Linear or Conv2d layer")
    walker = _Walker()
    walker.walk(module, "", None, {id(params[-1]): None})
    return walker


def spec_for_module(module: nn.Module) -> PermutationSpec:
    """The permutation spec of a layer tree built from supported layers (see :mod:`deepalign.core.arch`).

    A :class:`~deepalign.core.layers.ViT` is traced on its own example input.
    """
    if isinstance(module, ViT):
        from deepalign.core.trace import spec_from_model

        return spec_from_model(module, module.example_input())
    walker = _walk(module)
    return PermutationSpec(walker.groups, walker.axes)


def activation_probes(module: nn.Module) -> dict[str, str]:
    """Per group, the submodule path whose output is that group's post-activation signal.

    Activation matching hooks these modules; channels are axis 1 of the hooked output. A group whose
    neurons are never followed by an activation or pooling layer has no probe.
    """
    return _walk(module).probes
