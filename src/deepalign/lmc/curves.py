"""Loss and accuracy along the segment from A to aligned B, for one pair or many at once.

Classifiers: cross-entropy and accuracy on a data set (pass its test split). Other tasks pass
``loss_fn(output, y, lam) -> mean loss of the batch`` (e.g. INRs: MSE to ``(1 - lam) * target_A +
lam * target_B``); then no accuracy is reported. For networks with BatchNorm, ``bn_reset`` (training
inputs) recomputes the running statistics at every point (REPAIR-style reset): interpolated weights
with interpolated statistics are otherwise badly miscalibrated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepalign.core.functional import batched_forward
from deepalign.data.batches import labelled_batches, n_examples
from deepalign.errors import DeepAlignError
from deepalign.lmc.interpolate import interpolate
from deepalign.lmc.metrics import auc, barrier

LossFn = Callable[[Tensor, Tensor | None, float], Tensor]


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@torch.no_grad()
def reset_bn_stats(
    net: nn.Module, data: Any, batch_size: int = 256, max_batches: int | None = None
) -> nn.Module:
    """Recompute every BatchNorm's running mean/var as plain averages over ``data`` (in place)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return net
    device = next(net.parameters()).device
    momenta = [m.momentum for m in bns]
    net.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    for i, (x, _) in enumerate(labelled_batches(data, batch_size, device=device)):
        if max_batches is not None and i >= max_batches:
            break
        net(x)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    return net.eval()


def _batch_loss(out: Tensor, y: Tensor | None, lam: float, loss_fn: LossFn | None) -> Tensor:
    if loss_fn is not None:
        return loss_fn(out, y, lam)
    if y is None:
        raise DeepAlignError("lmc: classification data needs labels (or pass a loss function)")
    return per_example_ce(out, y).mean()


def per_example_ce(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per example of logits ``(..., batch, [positions...], classes)`` against labels
    ``(batch, [positions...])`` (a language model's next tokens too): the mean over positions."""
    lead = out.shape[: out.dim() - y.dim() - 1]
    flat = F.cross_entropy(
        out.reshape(-1, out.shape[-1]), y.expand(*lead, *y.shape).reshape(-1), reduction="none"
    )
    return flat.view(*lead, y.shape[0], -1).mean(-1)


def per_example_hits(out: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct argmax predictions per example (over positions, for sequences)."""
    lead = out.shape[: out.dim() - y.dim() - 1]
    hits = (out.argmax(dim=-1) == y).to(out.dtype)
    return hits.reshape(*lead, y.shape[0], -1).mean(-1)


@torch.no_grad()
def evaluate(
    net: nn.Module,
    data: Any,
    lam: float = 0.0,
    loss_fn: LossFn | None = None,
    batch_size: int = 512,
) -> tuple[float, float | None]:
    """Mean loss (and accuracy for classifiers) of one network over ``data``."""
    device = next(net.parameters()).device
    total, correct, n = 0.0, 0, 0
    for x, y in labelled_batches(data, batch_size, device=device):
        out = net(x)
        total += float(_batch_loss(out, y, lam, loss_fn)) * x.shape[0]
        if loss_fn is None:
            correct += float(per_example_hits(out, y).sum())
        n += x.shape[0]
    if n == 0:
        raise DeepAlignError("lmc: the data set is empty")
    return total / n, (correct / n if loss_fn is None else None)


def _summary(lambdas: Tensor, loss: Tensor, acc: Tensor | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "lambdas": lambdas,
        "loss": loss,
        "accuracy": acc,
        "barrier": barrier(lambdas, loss),
        "auc": auc(lambdas, loss),
    }
    if acc is not None:
        out["accuracy_barrier"] = barrier(lambdas, acc, higher_is_better=True)
        out["accuracy_auc"] = auc(lambdas, acc, higher_is_better=True)
    return out


def lmc_curve(
    module: nn.Module,
    a: Mapping[str, Tensor],
    b_aligned: Mapping[str, Tensor],
    data: Any,
    points: int = 25,
    *,
    loss_fn: LossFn | None = None,
    bn_reset: Any = None,
    batch_size: int = 512,
    bn_batches: int | None = None,
    on_point: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Loss and accuracy at ``points`` evenly spaced ``lam`` in [0, 1] (ends included);
    ``on_point(done, points)`` hears each finished ``lam``.

    Returns ``lambdas``, ``loss``, ``accuracy`` (1-D tensors; accuracy None with ``loss_fn``),
    ``barrier``, ``auc`` (and ``accuracy_barrier``/``accuracy_auc`` for classifiers).
    """
    if points < 2:
        raise DeepAlignError(f"lmc: need at least 2 points, got {points}")
    device = next(iter(a.values())).device
    net = copy.deepcopy(module).to(device).eval()
    lambdas = torch.linspace(0, 1, points, dtype=torch.float64)
    losses, accs = [], []
    for lam in lambdas.tolist():
        net.load_state_dict(interpolate(a, b_aligned, lam))
        if bn_reset is not None:
            reset_bn_stats(net, bn_reset, batch_size, bn_batches)
        loss, acc = evaluate(net, data, lam, loss_fn, batch_size)
        losses.append(loss)
        accs.append(acc)
        if on_point is not None:
            on_point(len(losses), points)
    acc_t = None if loss_fn is not None else torch.tensor(accs, dtype=torch.float64)
    return _summary(lambdas, torch.tensor(losses, dtype=torch.float64), acc_t)


@torch.no_grad()
def lmc_curves(
    module: nn.Module,
    a_stacked: Mapping[str, Tensor],
    b_stacked: Mapping[str, Tensor],
    data: Any,
    points: int = 25,
    *,
    loss_fn: LossFn | None = None,
    bn_reset: Any = None,
    batch_size: int = 512,
    chunk: int = 32,
    bn_batches: int | None = None,
) -> dict[str, Any]:
    """:func:`lmc_curve` for N pairs at once (leading N on every tensor); curves come back (N, K).

    Networks run ``chunk`` at a time through one vmapped forward per batch; with ``bn_reset`` each
    pair is evaluated on its own (running statistics must be recomputed per network).
    """
    first = next(iter(a_stacked.values()))
    n_pairs = first.shape[0]
    if bn_reset is not None:
        rows = [
            lmc_curve(
                module,
                {k: v[i] for k, v in a_stacked.items()},
                {k: v[i] for k, v in b_stacked.items()},
                data,
                points,
                loss_fn=loss_fn,
                bn_reset=bn_reset,
                batch_size=batch_size,
                bn_batches=bn_batches,
            )
            for i in range(n_pairs)
        ]
        loss = torch.stack([r["loss"] for r in rows])
        acc = None if loss_fn is not None else torch.stack([r["accuracy"] for r in rows])
        return _summary(rows[0]["lambdas"], loss, acc)
    if points < 2:
        raise DeepAlignError(f"lmc: need at least 2 points, got {points}")
    device = first.device
    net = copy.deepcopy(module).to(device).eval()
    lambdas = torch.linspace(0, 1, points, dtype=torch.float64)
    total = torch.zeros(n_pairs, points, dtype=torch.float64)
    correct = torch.zeros(n_pairs, points, dtype=torch.float64)
    count = n_examples(data)
    for j, lam in enumerate(lambdas.tolist()):
        for s in range(0, n_pairs, chunk):
            part_a = {k: v[s : s + chunk] for k, v in a_stacked.items()}
            part_b = {k: v[s : s + chunk] for k, v in b_stacked.items()}
            merged = interpolate(part_a, part_b, lam)
            m = next(iter(merged.values())).shape[0]
            for x, y in labelled_batches(data, batch_size, device=device):
                out = batched_forward(net, merged, x)  # (m, batch, ...)
                if loss_fn is not None:
                    per = torch.stack([loss_fn(out[i], y, lam) for i in range(m)])
                else:
                    if y is None:
                        raise DeepAlignError("lmc: classification data needs labels")
                    per = per_example_ce(out, y).mean(dim=1)
                    hits = per_example_hits(out, y).sum(dim=1)
                    correct[s : s + m, j] += hits.double().cpu()
                total[s : s + m, j] += per.double().cpu() * x.shape[0]
    loss = total / count
    acc = None if loss_fn is not None else correct / count
    return _summary(lambdas, loss, acc)
