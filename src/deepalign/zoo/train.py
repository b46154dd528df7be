"""Batched training of N models at once: one loss summed over models, one Adam over stacked tensors.

Adam acts element-wise and models never share a parameter, so ``sum_i loss_i`` with an optimiser
over the stacked tensors is exactly N independent trainings (each model's gradient is its own
loss's). Each model draws its data order from its own generator; a per-model permutation indexes
the training set, so every model sees its own batches in the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from deepalign.zoo.batched import Forward

Progress = Callable[[float], None]  # called with the fraction of this run done so far


def epoch_orders(order_seeds: Sequence[int], n: int, epochs: int) -> list[Tensor]:
    """Per epoch, ``(N, n)`` permutations: row i is model i's data order, from its own generator."""
    gens = [torch.Generator().manual_seed(int(s)) for s in order_seeds]
    return [torch.stack([torch.randperm(n, generator=g) for g in gens]) for _ in range(epochs)]


class Adam:
    """Adam (Kingma & Ba) over a list of tensors, as foreach tensor ops; the same update rule as
    ``torch.optim.Adam`` without its import cost. Element-wise, so stacked models stay independent.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        b1, b2 = self.betas
        self.t += 1
        torch._foreach_lerp_(self.m, grads, 1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - b2)
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, c2**0.5)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.m, denom, -self.lr / c1)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def _stacked_params(init: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.detach().to(device).clone().requires_grad_(True) for k, v in init.items()}


def train_classifiers(
    forward: Forward,
    init: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    order_seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    lr: float,
    progress: Progress | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Train N classifiers (cross-entropy, Adam) from stacked ``init``; returns weights and last-epoch train loss ``(N,)``."""
    device = x.device
    params = _stacked_params(init, device)
    opt = Adam(list(params.values()), lr)
    n_models, n = len(order_seeds), int(y.shape[0])
    steps = -(-n // batch_size)
    last = torch.zeros(n_models, device=device)
    for e, order in enumerate(epoch_orders(order_seeds, n, epochs)):
        order = order.to(device)
        total = torch.zeros(n_models, device=device)
        for s in range(steps):
            idx = order[:, s * batch_size : (s + 1) * batch_size]
            logits = forward(params, x[idx], False)
            per = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="none")
            loss = per.view(n_models, -1).mean(1)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            total += loss.detach() * idx.shape[1]
            if progress is not None:
                progress((e * steps + s + 1) / (epochs * steps))
        last = total / n
    return {k: v.detach() for k, v in params.items()}, last


@torch.no_grad()
def evaluate_classifiers(
    forward: Forward, params: Mapping[str, Tensor], x: Tensor, y: Tensor, chunk: int = 1000
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy of each model on ``(x, y)``, both ``(N,)``."""
    n_models = next(iter(params.values())).shape[0]
    loss = torch.zeros(n_models, dtype=torch.float64, device=x.device)
    correct = torch.zeros(n_models, dtype=torch.float64, device=x.device)
    for s in range(0, int(y.shape[0]), chunk):
        xb, yb = x[s : s + chunk], y[s : s + chunk]
        logits = forward(params, xb, True)
        ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(n_models), reduction="none")
        loss += ce.view(n_models, -1).sum(1).double()
        correct += (logits.argmax(-1) == yb).sum(1).double()
    n = int(y.shape[0])
    return (loss / n).float(), (correct / n).float()


def fit_inrs(
    forward: Forward,
    init: Mapping[str, Tensor],
    coords: Tensor,
    values: Tensor,
    steps: int,
    lr: float,
    progress: Progress | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Fit N INRs, model i to ``values[i]`` ``(P, d_out)`` on shared ``coords`` (full batch, MSE, Adam).

    Returns weights and the final MSE per model ``(N,)``.
    """
    params = _stacked_params(init, coords.device)
    opt = Adam(list(params.values()), lr)
    for s in range(steps):
        mse = ((forward(params, coords, True) - values) ** 2).flatten(1).mean(1)
        opt.zero_grad()
        mse.sum().backward()
        opt.step()
        if progress is not None:
            progress((s + 1) / steps)
    final = evaluate_inrs(forward, params, coords, values)
    return {k: v.detach() for k, v in params.items()}, final


@torch.no_grad()
def evaluate_inrs(
    forward: Forward, params: Mapping[str, Tensor], coords: Tensor, values: Tensor
) -> Tensor:
    """MSE of each model ``(N,)`` against its own target."""
    return ((forward(params, coords, True) - values) ** 2).flatten(1).mean(1)
