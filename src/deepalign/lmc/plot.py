"""The LMC figure: loss (and accuracy) against lam for the aligned and the naive interpolation."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepalign.core.io import atomic_path


def plot_curves(
    path: str | os.PathLike,
    curves: Mapping[str, Mapping[str, Any]],
    title: str = "",
    fmt: str | None = None,
) -> None:
    """One line per curve (label -> ``lmc_curve`` dict); a second panel for accuracy when present.

    ``fmt`` (png, pdf, svg) defaults to the file's suffix.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_acc = all(c.get("accuracy") is not None for c in curves.values())
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(10 if with_acc else 5.5, 4))
    axes = list(axes) if with_acc else [axes]
    for label, c in curves.items():
        lam = [float(v) for v in c["lambdas"]]
        axes[0].plot(
            lam,
            [float(v) for v in c["loss"]],
            marker=".",
            label=f"{label} (barrier {c['barrier']:.3g})",
        )
        if with_acc:
            axes[1].plot(lam, [float(v) for v in c["accuracy"]], marker=".", label=label)
    axes[0].set_xlabel("λ  (0 = A, 1 = aligned B)")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    if with_acc:
        axes[1].set_xlabel("λ  (0 = A, 1 = aligned B)")
        axes[1].set_ylabel("accuracy")
        axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)
