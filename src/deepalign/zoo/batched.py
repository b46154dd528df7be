"""Many networks of one architecture as one computation: seeded init and the batched forward.

``make_forward`` returns ``f(params, x) -> (N, batch, ...)`` for stacked params. Plain chains of
``Linear`` + ReLU/Sine (MLPs, SIRENs) run as ``bmm`` directly, about twice as fast on CPU as
the general path; other architectures go through :func:`deepalign.core.functional.batched_forward`
(``vmap``) on accelerators and a per-model loop inside each step on CPU. All give the same numbers
(tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from deepalign.core.arch import Config, build
from deepalign.core.functional import batched_forward, stack_states
from deepalign.core.layers import Sine

Forward = Callable[[Mapping[str, Tensor], Tensor, bool], Tensor]


def init_state(config: Config, seed: int) -> dict[str, Tensor]:
    """Fresh weights of ``config`` drawn from ``seed`` alone (PyTorch's default init; SIREN's for sines).

    The global RNG is forked, so callers' random state is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build(config)
        _siren_init_(module)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def init_states(config: Config, seeds: Sequence[int]) -> dict[str, Tensor]:
    """Stacked :func:`init_state` for each seed."""
    return stack_states([init_state(config, s) for s in seeds])


def _siren_init_(module: nn.Module) -> None:
    """Sitzmann et al.'s init: first layer U(-1/in, 1/in), later layers U(-sqrt(6/in)/w0, ...)."""
    layers = list(module.modules()) if isinstance(module, nn.Sequential) else []
    if not any(isinstance(m, Sine) for m in layers):
        return
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    sines = [m for m in layers if isinstance(m, Sine)]
    w0 = sines[0].w0
    with torch.no_grad():
        for j, lin in enumerate(linears):
            bound = 1.0 / lin.in_features if j == 0 else math.sqrt(6.0 / lin.in_features) / w0
            lin.weight.uniform_(-bound, bound)


def _plain_chain(config: Config) -> list[tuple[str, object]] | None:
    """The ops of a Flatten? (Linear act)* Linear chain, or None when the fast path does not apply."""
    if config.get("type") != "Sequential":
        return None
    ops: list[tuple[str, object]] = []
    for i, layer in enumerate(config["layers"]):
        kind = layer.get("type")
        if (
            kind == "Flatten"
            and i == 0
            and layer.get("start_dim") == 1
            and layer.get("end_dim") == -1
        ):
            ops.append(("flatten", None))
        elif kind == "Linear" and layer.get("bias", True):
            ops.append(("linear", str(i)))
        elif kind == "ReLU":
            ops.append(("relu", None))
        elif kind == "Sine":
            ops.append(("sine", float(layer["w0"])))
        else:
            return None
    return ops


def _chain_forward(ops: list[tuple[str, object]]) -> Forward:
    def forward(params: Mapping[str, Tensor], x: Tensor, shared_input: bool) -> Tensor:
        h, per_model = x, not shared_input
        n = next(iter(params.values())).shape[0]
        for op, arg in ops:
            if op == "flatten":
                h = h.flatten(2 if per_model else 1)
            elif op == "linear":
                w, b = params[f"{arg}.weight"], params[f"{arg}.bias"]
                if not per_model:
                    h, per_model = h.unsqueeze(0).expand(n, *h.shape), True
                h = torch.bmm(h, w.transpose(1, 2)) + b.unsqueeze(1)
            elif op == "relu":
                h = torch.relu(h)
            else:
                h = torch.sin(arg * h)  # type: ignore[operator]
        return h

    return forward


def _looped_forward(module: nn.Module) -> Forward:
    """Models one after another inside the step (one graph, one backward, one optimiser step)."""

    def forward(params: Mapping[str, Tensor], x: Tensor, shared_input: bool) -> Tensor:
        keys = list(params)
        per_model = zip(*[params[k].unbind(0) for k in keys], strict=True)
        outs = [
            functional_call(
                module, dict(zip(keys, vals, strict=True)), (x if shared_input else x[i],)
            )
            for i, vals in enumerate(per_model)
        ]
        return torch.stack(outs)

    return forward


def make_forward(config: Config, device: torch.device | str = "cpu") -> Forward:
    """``f(params, x, shared_input) -> (N, batch, ...)``: x is ``(batch, ...)`` or ``(N, batch, ...)``.

    MLP/SIREN chains: stacked ``bmm``. Other architectures: ``vmap`` on accelerators; on CPU a
    loop over the models inside the step, since vmapped (grouped) convolutions train several times
    slower there than one convolution per model (``docs/benchmarks.md``, zoo training).
    """
    ops = _plain_chain(config)
    if ops is not None:
        return _chain_forward(ops)
    module = build(config).eval()
    if torch.device(device).type == "cpu":
        return _looped_forward(module)

    def general(params: Mapping[str, Tensor], x: Tensor, shared_input: bool) -> Tensor:
        return batched_forward(module, params, x, shared_input=shared_input)

    return general
