"""The bench's input checks, all made before any work: methods, numbers, output folder, aligner."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from deepalign.errors import DeepAlignError
from deepalign.nn.model import DeepAlign
from deepalign.solvers import Chain
from deepalign.solvers.deepalign import check_aligner
from deepalign.zoo.loader import Zoo


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from ``"a,b,c"`` or a list; duplicates dropped, order kept; unknown -> error."""
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    out: list[str] = []
    for m in (str(x).strip() for x in items):
        if not m:
            continue
        Chain.parse(m)  # one-line error for unknown names
        if m not in out:
            out.append(m)
    if not out:
        raise DeepAlignError("--methods: no method given")
    return out


def check_numbers(
    pairs: int,
    seeds: int,
    points: int,
    sinkhorn_steps: int,
    data_examples: int,
    eval_examples: int | None,
    trajectory_pairs: int,
    sinkhorn_chunk: int,
) -> None:
    """One-line errors for counts no run can use (named as the CLI flags)."""
    if pairs <= 0 or seeds <= 0:
        raise DeepAlignError(f"--pairs and --seeds must be positive, got {pairs} and {seeds}")
    if points < 2:
        raise DeepAlignError(f"--points must be at least 2, got {points}")
    if sinkhorn_steps < 1:
        raise DeepAlignError(f"--sinkhorn-steps must be at least 1, got {sinkhorn_steps}")
    if data_examples <= 0 or (eval_examples is not None and eval_examples <= 0):
        raise DeepAlignError("--data-examples and --eval-examples must be positive")
    if trajectory_pairs < 0:
        raise DeepAlignError(f"--trajectory-pairs must be >= 0, got {trajectory_pairs}")
    if sinkhorn_chunk < 0:
        raise DeepAlignError(f"sinkhorn_chunk must be >= 0, got {sinkhorn_chunk}")


def check_options(
    method_list: Sequence[str], options: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per-method options: every method named must be in the run, every option known and typed."""
    out = {m: dict(o) for m, o in options.items()}
    unknown = sorted(set(out) - set(method_list))
    if unknown:
        raise DeepAlignError(f"options given for methods not in the run: {', '.join(unknown)}")
    for m, opts in out.items():
        Chain.parse(m).check_options(opts)
    return out


def load_aligner(aligner: Any, zoo: Zoo, device: torch.device) -> DeepAlign:
    """The aligner (a folder or a loaded model) on ``device``, checked against the zoo's networks."""
    if isinstance(aligner, DeepAlign):
        model, where = aligner.to(device).eval(), "aligner"
    elif isinstance(aligner, str | os.PathLike):
        model, where = DeepAlign.from_pretrained(aligner, device), str(aligner)
    else:
        raise DeepAlignError(
            f"aligner: expected a folder or a DeepAlign model, got {type(aligner)}"
        )
    check_aligner(model, zoo.spec, where, zoo.config, module=zoo.module())
    return model


def check_out(out: str | os.PathLike) -> Path:
    """Refuse an output folder that cannot be written, before any work (no partial output)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DeepAlignError(f"{out}: exists and is not a folder (--out takes a folder)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise DeepAlignError(f"{out}: cannot write here ({probe} is not a writable folder)")
    return out
