"""What the bench measures with: the data solvers may use, and the LMC curves of aligned pairs.

Classifiers: solvers that use data (am, sinkhorn's task loss) see a fixed subset of the zoo's
TRAIN split; curves are cross-entropy and accuracy on its TEST split (optionally a fixed subset),
all pairs at once through one vmapped forward. INR zoos: solvers see the shared coordinates
(sinkhorn stays on its data-free L2 loss), and the loss along the segment is the MSE to
``(1 - lam) * target_A + lam * target_B`` (the same target for two views of one image or wave).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepalign.core.seeds import derive_seed
from deepalign.lmc.curves import has_batchnorm, lmc_curve, lmc_curves
from deepalign.lmc.metrics import auc, barrier
from deepalign.zoo.loader import Zoo


@dataclass
class TaskData:
    """Data of one bench run, already on its device."""

    kind: str  # "classifier" or the INR kind
    solver_data: Any  # what data-using solvers get (Dataset subset, or INR coordinates)
    solver_examples: int
    eval_data: Any = None  # classifiers: the test split (or a subset)
    eval_examples: int = 0
    coords: Tensor | None = None  # INRs
    targets: dict[int, Tensor] | None = None  # INRs: model index -> target values (P, d_out)
    bn_reset: Any = None  # classifiers with BatchNorm: recompute statistics on this data

    @property
    def is_classifier(self) -> bool:
        return self.kind == "classifier"

    @property
    def loss_name(self) -> str:
        return "cross-entropy" if self.is_classifier else "MSE"


def task_data(
    zoo: Zoo,
    indices: Sequence[int],
    device: torch.device,
    solver_examples: int,
    eval_examples: int | None,
    seed: int,
) -> TaskData:
    """Load what the bench needs for the models ``indices`` (the networks of every drawn pair)."""
    if zoo.kind == "classifier":
        train = zoo.dataset("train")
        train = train.subset(min(solver_examples, len(train)), seed=derive_seed(seed, "bench-am"))
        test = zoo.dataset("test")
        if eval_examples is not None and eval_examples < len(test):
            test = test.subset(eval_examples, seed=derive_seed(seed, "bench-eval"))
        module = zoo.module()
        return TaskData(
            kind=zoo.kind,
            solver_data=train.to(device),
            solver_examples=len(train),
            eval_data=test.to(device),
            eval_examples=len(test),
            bn_reset=train.to(device) if has_batchnorm(module) else None,
        )
    idx = sorted(set(int(i) for i in indices))
    tg = zoo.targets(idx).to(device)
    return TaskData(
        kind=zoo.kind,
        solver_data=tg.coords,
        solver_examples=int(tg.coords.shape[0]),
        eval_examples=int(tg.coords.shape[0]),
        coords=tg.coords,
        targets={i: tg.values[j] for j, i in enumerate(idx)},
    )


def pair_curves(
    module: nn.Module,
    a: Mapping[str, Tensor],
    b_aligned: Mapping[str, Tensor],
    pairs: Sequence[tuple[int, int]],
    data: TaskData,
    points: int,
) -> dict[str, Any]:
    """LMC curves of N stacked pairs: ``lambdas`` (K,), ``loss`` (N, K), ``accuracy`` (N, K) or
    None, ``barrier`` (N,), ``auc`` (N,)."""
    if data.is_classifier:
        out = lmc_curves(module, a, b_aligned, data.eval_data, points, bn_reset=data.bn_reset)
        return {k: out[k] for k in ("lambdas", "loss", "accuracy", "barrier", "auc")}
    assert data.targets is not None and data.coords is not None
    rows = []
    for i, (ia, ib) in enumerate(pairs):
        ta, tb = data.targets[ia], data.targets[ib]

        def mse(out: Tensor, _y: Tensor | None, lam: float, ta=ta, tb=tb) -> Tensor:
            return F.mse_loss(out, (1 - lam) * ta + lam * tb)

        rows.append(
            lmc_curve(
                module,
                {k: v[i] for k, v in a.items()},
                {k: v[i] for k, v in b_aligned.items()},
                data.coords,
                points,
                loss_fn=mse,
                batch_size=int(data.coords.shape[0]),
            )
        )
    lambdas = rows[0]["lambdas"]
    loss = torch.stack([r["loss"] for r in rows])
    return {
        "lambdas": lambdas,
        "loss": loss,
        "accuracy": None,
        "barrier": torch.as_tensor(barrier(lambdas, loss)).reshape(-1),
        "auc": torch.as_tensor(auc(lambdas, loss)).reshape(-1),
    }


def value_at(lambdas: Tensor, curves: Tensor, lam: float = 0.5) -> Tensor:
    """Each curve's value at ``lam`` (linear interpolation between grid points), ``(N,)``."""
    lam_t = torch.as_tensor(lambdas, dtype=torch.float64)
    c = torch.as_tensor(curves, dtype=torch.float64)
    j = int(
        torch.searchsorted(lam_t, torch.tensor([lam], dtype=torch.float64)).clamp(1, len(lam_t) - 1)
    )
    lo, hi = lam_t[j - 1], lam_t[j]
    w = float((lam - lo) / (hi - lo))
    return (1 - w) * c[..., j - 1] + w * c[..., j]
