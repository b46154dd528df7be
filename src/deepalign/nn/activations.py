"""The activation between two layers of a chain network, named, so an aligner can record it.

Probe features (:mod:`deepalign.nn.probes`) run the networks' own computation on the weight-space
view, so they need the function applied after each hidden layer. Users write it in any style
(``nn.ReLU()`` modules, ``F.relu`` in ``forward``, ``torch.sin(30 * x)``), so it is found by
measurement: one forward pass with hooks on the chain's linear layers, and each candidate function
checked against what the layer emitted and what the next one received.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deepalign.core.layers import Sine
from deepalign.errors import DeepAlignError

_FIXED = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
}


def activation_module(name: str) -> nn.Module:
    """The module computing the activation ``name`` (``relu``, ``gelu``, ..., ``sine:W0``)."""
    if name.startswith("sine:"):
        try:
            return Sine(float(name.split(":", 1)[1]))
        except ValueError:
            raise DeepAlignError(f"unknown activation {name!r} (sine:W0 needs a number)") from None
    if name not in _FIXED:
        raise DeepAlignError(
            f"unknown activation {name!r} (choose from {', '.join(_FIXED)}, sine:W0)"
        )
    return _Fn(name)


class _Fn(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return _FIXED[self.name](x)

    def extra_repr(self) -> str:
        return self.name


def _candidates(module: nn.Module) -> list[str]:
    """Every named activation, with the sine frequencies the module's own ``Sine`` layers use."""
    sines = {float(m.w0) for m in module.modules() if isinstance(m, Sine)} | {30.0, 1.0}
    return list(_FIXED) + [f"sine:{w:g}" for w in sorted(sines)]


@torch.no_grad()
def identify_activations(
    module: nn.Module, linear_keys: Sequence[str], example: Tensor | tuple[Tensor, ...]
) -> tuple[str, ...] | None:
    """The activation after each hidden layer of a chain of ``nn.Linear`` layers (``linear_keys``:
    their weight keys in chain order), measured on ``example``; None when a forward pass fails or a
    step between two layers is not one of the named functions (dropout is off in eval mode)."""
    layers = []
    for key in linear_keys:
        try:
            layers.append(module.get_submodule(key.rsplit(".", 1)[0] if "." in key else ""))
        except AttributeError:
            return None
    if not all(isinstance(m, nn.Linear) for m in layers):
        return None
    outs: dict[int, Tensor] = {}
    ins: dict[int, Tensor] = {}
    hooks = []
    for i, m in enumerate(layers):
        hooks.append(m.register_forward_hook(lambda _m, args, out, i=i: outs.__setitem__(i, out)))
        hooks.append(m.register_forward_pre_hook(lambda _m, args, i=i: ins.__setitem__(i, args[0])))
    was_training = module.training
    module.eval()
    try:
        module(*(example if isinstance(example, tuple) else (example,)))
    except Exception:  # noqa: BLE001 - the user's forward may reject a guessed example
        return None
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    names = []
    for i in range(len(layers) - 1):
        z, h = outs.get(i), ins.get(i + 1)
        if z is None or h is None or z.shape != h.shape:
            return None
        scale = float(h.abs().max().clamp_min(1.0))
        found = next(
            (
                name
                for name in _candidates(module)
                if torch.allclose(activation_module(name)(z), h, rtol=1e-4, atol=1e-5 * scale)
            ),
            None,
        )
        if found is None:
            return None
        names.append(found)
    return tuple(names)
