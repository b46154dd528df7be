"""Shared fixtures: tiny models on disk and a CLI runner that calls the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepalign.cli.app import main

# The suite's tensors are tiny: one thread avoids oversubscription on 2-core CI machines.
# DEEPALIGN_TEST_THREADS=2 runs it on two (make test does both: tolerances must hold either way).
THREADS = int(os.environ.get("DEEPALIGN_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run ``deepalign ARGS`` in-process; returns exit code, stdout and stderr."""

    def run(*args: str) -> CliResult:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_subprocess(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter (used where a test must kill or isolate it)."""
    return subprocess.run(
        [sys.executable, "-m", "deepalign.cli.app", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def randomize_bn_stats(module: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers trained-looking running stats (fresh ones hide permutation bugs)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.fixture(autouse=True)
def _threads():
    """Every test runs on THREADS torch threads, and a test that changes it cannot leak the change."""
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def recovers_planted(
    spec, state, method: str = "wm", seed: int = 0, **options
) -> tuple[bool, dict]:
    """Plant a seeded permutation in ``state`` and align it back with ``method``: whether exactly
    its inverse came back (heads checked to move as blocks), and the solver's info."""
    from deepalign.core import permutation as P
    from deepalign.solvers import align

    planted = P.random_permutation(spec, seed=seed)
    found, info = align(state, P.apply(spec, planted, state), spec, method, **options)
    P.check_structure(spec, found)
    want = P.invert(planted)
    return all(torch.equal(found[g], want[g]) for g in spec.groups), info
