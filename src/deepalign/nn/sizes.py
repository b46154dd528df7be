"""Named Deep-Align sizes (``DeepAlignConfig`` fields): what ``deepalign train --size`` and the demo use.

``paper`` is the paper's configuration (§3.2); ``cpu`` is sized to train in minutes on a 2-core
CPU (measurements in ``docs/results.md``); ``tiny`` is for smoke tests. Probe features
(``probes``) are chosen per architecture by :func:`default_probes`, not by size.
"""

from __future__ import annotations

from typing import Any

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden": 8,
        "n_layers": 1,
        "out_features": 16,
        "edge_channels": 4,
        "set_layer": "deepsets",
        "init_scale": 3.0,
    },
    "cpu": {"hidden": 32, "n_layers": 2, "out_features": 64, "edge_channels": 8, "init_scale": 3.0},
    "paper": {},
}

DEFAULT_PROBES = 64  # probe inputs for MLP and SIREN chains (docs/results.md: the levers table)


def default_probes(arch: dict[str, Any]) -> int:
    """:data:`DEFAULT_PROBES` for architectures probe features support (MLP/SIREN chains), else 0."""
    from deepalign.nn.probes import supports_probes
    from deepalign.nn.weight_space import WeightSpaceLayout

    return DEFAULT_PROBES if supports_probes(WeightSpaceLayout.from_config(arch)) else 0
