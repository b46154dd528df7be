"""Named Deep-Align sizes (``DeepAlignConfig`` fields): what ``deepalign train --size`` and the demo use.

``paper`` is the paper's configuration (§3.2); ``cpu`` is sized to train in minutes on a 2-core
CPU (measurements in ``docs/results.md``); ``tiny`` is for smoke tests.
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
