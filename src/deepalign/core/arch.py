"""Architectures as JSON: every supported layer round-trips through a small config dict.

``describe(module)`` turns a module built from supported layers into a config; ``build(config)``
rebuilds it. Checkpoints store this config in their metadata, so a file describes itself. The
builders at the bottom make the networks deepalign trains and aligns (MLP, CNN, ResNet, SIREN);
they return plain ``nn.Sequential`` trees of supported layers, so one mechanism covers them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from deepalign.core.layers import Residual, Sine, ViT
from deepalign.errors import DeepAlignError

Config = dict[str, Any]


def _attrs(*names: str) -> Callable[[nn.Module], dict]:
    def read(m: nn.Module) -> dict:
        out = {}
        for n in names:
            v = getattr(m, n)
            out[n] = list(v) if isinstance(v, tuple) else v
        return out

    return read


def _has_bias(m: nn.Module) -> dict:
    return {"bias": m.bias is not None}


_PLAIN = {
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "SiLU": nn.SiLU,
    "Identity": nn.Identity,
}

# name -> (class, function reading the constructor arguments from an instance)
_LAYERS: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict]]] = {
    "Linear": (nn.Linear, lambda m: {**_attrs("in_features", "out_features")(m), **_has_bias(m)}),
    "Conv2d": (
        nn.Conv2d,
        lambda m: {
            **_attrs("in_channels", "out_channels", "kernel_size", "stride", "padding")(m),
            **_has_bias(m),
        },
    ),
    "BatchNorm1d": (
        nn.BatchNorm1d,
        _attrs("num_features", "eps", "momentum", "affine", "track_running_stats"),
    ),
    "BatchNorm2d": (
        nn.BatchNorm2d,
        _attrs("num_features", "eps", "momentum", "affine", "track_running_stats"),
    ),
    "LayerNorm": (nn.LayerNorm, _attrs("normalized_shape", "eps", "elementwise_affine")),
    "LeakyReLU": (nn.LeakyReLU, _attrs("negative_slope")),
    "ELU": (nn.ELU, _attrs("alpha")),
    "Dropout": (nn.Dropout, _attrs("p")),
    "Flatten": (nn.Flatten, _attrs("start_dim", "end_dim")),
    "MaxPool2d": (nn.MaxPool2d, _attrs("kernel_size", "stride", "padding")),
    "AvgPool2d": (nn.AvgPool2d, _attrs("kernel_size", "stride", "padding")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, _attrs("output_size")),
    "Sine": (Sine, _attrs("w0")),
    "ViT": (
        ViT,
        _attrs(
            "image_size",
            "patch_size",
            "in_channels",
            "dim",
            "depth",
            "heads",
            "mlp_dim",
            "n_classes",
        ),
    ),
    **{name: (cls, lambda m: {}) for name, cls in _PLAIN.items()},
}
_BY_CLASS = {cls: name for name, (cls, _) in _LAYERS.items()}
SUPPORTED_LAYERS = tuple(sorted([*_LAYERS, "Sequential", "Residual"]))


def describe(module: nn.Module, where: str = "model") -> Config:
    """The JSON config of ``module``; an unsupported layer gives an error naming it."""
    if type(module) is nn.Sequential:
        return {
            "type": "Sequential",
            "layers": [describe(m, f"{where}.{i}") for i, m in enumerate(module)],
        }
    if type(module) is Residual:
        short = (
            None
            if isinstance(module.shortcut, nn.Identity)
            else describe(module.shortcut, f"{where}.shortcut")
        )
        return {
            "type": "Residual",
            "body": describe(module.body, f"{where}.body"),
            "shortcut": short,
        }
    name = _BY_CLASS.get(type(module))
    if name is None:
        raise DeepAlignError(
            f"{where}: unsupported layer {type(module).__name__} (supported: {', '.join(SUPPORTED_LAYERS)})"
        )
    return {"type": name, **_LAYERS[name][1](module)}


def build(config: Config, where: str = "architecture") -> nn.Module:
    """Rebuild a module (fresh weights) from its config."""
    try:
        kind = config["type"]
        if kind == "UserModel":
            from deepalign.core.user_model import build_user_arch

            return build_user_arch(config)
        if kind == "Sequential":
            return nn.Sequential(
                *[build(c, f"{where}.{i}") for i, c in enumerate(config["layers"])]
            )
        if kind == "Residual":
            short = config.get("shortcut")
            return Residual(
                build(config["body"], f"{where}.body"), None if short is None else build(short)
            )
        if kind not in _LAYERS:
            raise DeepAlignError(f"{where}: unknown layer type {kind!r}")
        kwargs = {
            k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k != "type"
        }
        return _LAYERS[kind][0](**kwargs)
    except DeepAlignError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise DeepAlignError(
            f"{where}: malformed architecture ({exc.__class__.__name__}: {exc})"
        ) from None


# -- builders -------------------------------------------------------------------------------------
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise DeepAlignError(f"unknown activation {name!r} (choose from {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]()


def mlp(
    widths: Sequence[int], act: str = "relu", norm: str | None = None, flatten_input: bool = False
) -> nn.Sequential:
    """``widths = [d_in, h_1, ..., d_out]``; ``norm`` is None, "batchnorm" or "layernorm".

    ``flatten_input`` puts a ``Flatten`` first, so the MLP takes images like a CNN does.
    """
    if len(widths) < 2:
        raise DeepAlignError("an MLP needs at least an input and an output width")
    layers: list[nn.Module] = [nn.Flatten()] if flatten_input else []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if norm == "batchnorm":
                layers.append(nn.BatchNorm1d(b))
            elif norm == "layernorm":
                layers.append(nn.LayerNorm(b))
            elif norm is not None:
                raise DeepAlignError(f"unknown norm {norm!r}")
            layers.append(activation(act))
    return nn.Sequential(*layers)


def cnn(
    in_channels: int,
    channels: Sequence[int],
    n_classes: int,
    image_size: int,
    pool_every: int = 1,
    act: str = "relu",
    batchnorm: bool = False,
) -> nn.Sequential:
    """3x3 'same' conv stack with a 2x2 max-pool after every ``pool_every`` convs, then a linear head."""
    layers: list[nn.Module] = []
    size, c_in = image_size, in_channels
    for i, c in enumerate(channels):
        layers.append(nn.Conv2d(c_in, c, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c))
        layers.append(activation(act))
        if (i + 1) % pool_every == 0 and size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        c_in = c
    layers += [nn.Flatten(), nn.Linear(c_in * size * size, n_classes)]
    return nn.Sequential(*layers)


def resnet(
    in_channels: int, widths: Sequence[int], n_classes: int, blocks_per_stage: int = 1
) -> nn.Sequential:
    """A small ResNet with BatchNorm: a stem, residual stages (1x1 projection when widths change), a head."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    c = widths[0]
    for w in widths:
        for _ in range(blocks_per_stage):
            body = nn.Sequential(
                nn.Conv2d(c, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
            )
            short = (
                None if w == c else nn.Sequential(nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w))
            )
            layers += [Residual(body, short), nn.ReLU()]
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes)]
    return nn.Sequential(*layers)


def siren(widths: Sequence[int], w0: float = 30.0) -> nn.Sequential:
    """A SIREN INR: ``sin(w0 (W x + b))`` on every hidden layer, linear output."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(Sine(w0))
    return nn.Sequential(*layers)
