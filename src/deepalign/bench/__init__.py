"""The bench: every alignment method on the same held-out pairs of a zoo (barrier, AUC, time,
curves), and the end-to-end demo on the embedded default."""

from deepalign.bench.report import OUTPUTS, markdown, write_outputs
from deepalign.bench.runner import DEFAULT_METHODS, LABELS, parse_methods, run_bench

__all__ = [
    "DEFAULT_METHODS",
    "LABELS",
    "OUTPUTS",
    "markdown",
    "parse_methods",
    "run_bench",
    "write_outputs",
]
