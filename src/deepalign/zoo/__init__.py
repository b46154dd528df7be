"""Model zoos: many networks of one architecture trained at once, stored in resumable shards.

Names load on first use (the task table is cheap; training and loading need torch).
"""

from __future__ import annotations

import importlib
from typing import Any

from deepalign.zoo.tasks import DEFAULT_TASK, TASKS, Task, get_task

_LAZY = {
    "ShardSlice": "deepalign.zoo.build",
    "build_zoo": "deepalign.zoo.build",
    "prepare_zoo": "deepalign.zoo.build",
    "Zoo": "deepalign.zoo.loader",
    "ZooPlan": "deepalign.zoo.plan",
    "make_plan": "deepalign.zoo.plan",
}

__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "ShardSlice",
    "Task",
    "Zoo",
    "ZooPlan",
    "build_zoo",
    "get_task",
    "make_plan",
    "prepare_zoo",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepalign.zoo' has no attribute {name!r}")
