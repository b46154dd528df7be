"""The bench's two figures: mean LMC curves of every method, and barrier vs Sinkhorn iterations.

``sinkhorn_init.png`` is the paper's Fig. 4 claim in our setting: Sinkhorn started from the
Deep-Align answer reaches a low barrier in fewer iterations than from the identity, from scratch
(near-uniform scores) or from WM. Methods that do not iterate (naive, WM, AM, Deep-Align) are drawn
as horizontal reference lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepalign.bench.stats import mean_std
from deepalign.core.io import atomic_path
from deepalign.lmc.plot import plot_curves


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {m: e for m, e in result["methods"].items() if e["status"] == "ok"}


def _empty(path: Path, text: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _start_text(start: str) -> str:
    return "near-uniform scores" if start == "none" else start


def plot_lmc(path: str | os.PathLike, result: Mapping[str, Any]) -> None:
    """Mean loss (and accuracy) along the segment for every method that ran."""
    s = result["settings"]
    ok = _ok(result)
    if not ok:
        _empty(Path(path), "no method finished: see bench.md for the errors")
        return
    curves = {
        e["label"]: {
            "lambdas": e["curve"]["lambdas"],
            "loss": e["curve"]["loss"],
            "accuracy": e["curve"]["accuracy"],
            "barrier": e["summary"]["barrier"]["mean"],
        }
        for e in ok.values()
    }
    title = (
        f"{s['task']}: mean {s['loss']} over {s['pairs']} pairs x {s['seeds']} seed(s) "
        "(legend: mean barrier)"
    )
    plot_curves(path, curves, title=title, fmt="png")


def plot_sinkhorn_init(path: str | os.PathLike, result: Mapping[str, Any]) -> None:
    """Barrier (mean over the recorded pairs, ±1 std band) at each recorded Sinkhorn step."""
    traj = result.get("sinkhorn_init") or {}
    methods = result["methods"]
    if not traj:
        _empty(Path(path), "no Sinkhorn method finished: nothing to plot")
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    n_ref = int(result["settings"]["trajectory_pairs"])
    colour = {m: f"C{i % 10}" for i, m in enumerate(_ok(result))}  # as in lmc.png
    for m, t in traj.items():
        steps = t["steps"]
        mean, std = t["barrier_mean"], t["barrier_std"]
        name = t.get("label") or (methods[m]["label"] if m in methods else m)
        c = colour.setdefault(m, f"C{len(colour) % 10}")
        ax.plot(
            steps,
            mean,
            marker="o",
            ms=3,
            color=c,
            label=f"{name} (start: {_start_text(t['start'])})",
        )
        lo = [x - d for x, d in zip(mean, std, strict=True)]
        hi = [x + d for x, d in zip(mean, std, strict=True)]
        ax.fill_between(steps, lo, hi, color=c, alpha=0.12)
    for m, e in _ok(result).items():
        if m in traj:
            continue
        vals = [r["barrier"] for r in e["pairs"] if r["pos"] < n_ref]
        if vals:
            ax.axhline(
                mean_std(vals)["mean"], ls="--", lw=1, color=colour[m],
                label=f"{e['label']} (no iterations)",
            )  # fmt: skip
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("Sinkhorn iterations (gradient steps)")
    ax.set_ylabel(f"barrier ({result['settings']['loss']})")
    ax.set_title(f"{result['settings']['task']}: barrier vs Sinkhorn iterations by start")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
