"""deepalign: align, merge and compare neural-network weights, and learn to align with Deep-Align.

The public names below load on first use, so ``import deepalign`` (and ``deepalign --help``) does
not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "zoo_from_checkpoints": "deepalign.zoo.from_checkpoints",
    "Zoo": "deepalign.zoo.loader",
    "train_aligner": "deepalign.training.trainer",
    "TrainConfig": "deepalign.training.loop",
    "DeepAlignConfig": "deepalign.nn.model",
    "DeepAlign": "deepalign.nn.model",
    "AxisPerm": "deepalign.core.spec",
    "DeepAlignError": "deepalign.errors",
    "Network": "deepalign.core.checkpoint",
    "Permutation": "deepalign.core.permutation",
    "PermutationSpec": "deepalign.core.spec",
    "align_models": "deepalign.api",
    "apply": "deepalign.core.permutation",
    "apply_soft": "deepalign.core.permutation",
    "build": "deepalign.core.arch",
    "cnn": "deepalign.core.arch",
    "compose": "deepalign.core.permutation",
    "describe": "deepalign.core.arch",
    "identity": "deepalign.core.permutation",
    "invert": "deepalign.core.permutation",
    "load_model": "deepalign.core.checkpoint",
    "load_network": "deepalign.core.checkpoint",
    "load_state": "deepalign.core.checkpoint",
    "merge_models": "deepalign.api",
    "mlp": "deepalign.core.arch",
    "permuted_module": "deepalign.core.verify",
    "random_permutation": "deepalign.core.permutation",
    "resnet": "deepalign.core.arch",
    "save_model": "deepalign.core.checkpoint",
    "save_state": "deepalign.core.checkpoint",
    "siren": "deepalign.core.arch",
    "spec_for_module": "deepalign.core.spec_builders",
    "spec_from_model": "deepalign.core.trace",
    "spec_of": "deepalign.core.user_model",
    "verify": "deepalign.core.verify",
    "write_state": "deepalign.core.checkpoint",
}

__all__ = [
    "zoo_from_checkpoints",
    "Zoo",
    "train_aligner",
    "TrainConfig",
    "DeepAlignConfig",
    "DeepAlign",
    "AxisPerm",
    "DeepAlignError",
    "Network",
    "Permutation",
    "PermutationSpec",
    "align_models",
    "apply",
    "apply_soft",
    "build",
    "cnn",
    "compose",
    "describe",
    "identity",
    "invert",
    "load_model",
    "load_network",
    "load_state",
    "merge_models",
    "mlp",
    "permuted_module",
    "random_permutation",
    "resnet",
    "save_model",
    "save_state",
    "siren",
    "spec_for_module",
    "spec_from_model",
    "spec_of",
    "verify",
    "write_state",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from deepalign.api import align_models, merge_models
    from deepalign.core.arch import build, cnn, describe, mlp, resnet, siren
    from deepalign.core.checkpoint import (
        Network,
        load_model,
        load_network,
        load_state,
        save_model,
        save_state,
        write_state,
    )
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
    from deepalign.core.user_model import spec_of
    from deepalign.core.verify import permuted_module, verify
    from deepalign.errors import DeepAlignError
    from deepalign.nn.model import DeepAlign, DeepAlignConfig
    from deepalign.training.loop import TrainConfig
    from deepalign.training.trainer import train_aligner
    from deepalign.zoo.from_checkpoints import zoo_from_checkpoints
    from deepalign.zoo.loader import Zoo
