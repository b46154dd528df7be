"""deepalign: align, merge and compare neural-network weights, and learn to align with Deep-Align."""

from deepalign.core.arch import build, cnn, describe, mlp, resnet, siren
from deepalign.core.checkpoint import load_model, load_state, save_model, save_state
from deepalign.core.permutation import (
    Permutation,
    apply,
    apply_soft,
    compose,
    identity,
    invert,
    random_permutation,
)
from deepalign.core.spec import AxisPerm, PermutationSpec
from deepalign.core.spec_builders import spec_for_module
from deepalign.core.trace import spec_from_model
from deepalign.core.verify import permuted_module, verify
from deepalign.errors import DeepAlignError

__version__ = "0.1.0"

__all__ = [
    "AxisPerm",
    "DeepAlignError",
    "Permutation",
    "PermutationSpec",
    "apply",
    "apply_soft",
    "build",
    "cnn",
    "compose",
    "describe",
    "identity",
    "invert",
    "load_model",
    "load_state",
    "mlp",
    "permuted_module",
    "random_permutation",
    "resnet",
    "save_model",
    "save_state",
    "siren",
    "spec_for_module",
    "spec_from_model",
    "verify",
]
