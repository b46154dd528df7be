"""Model zoos: many networks of one architecture trained at once, stored in resumable shards."""

from deepalign.zoo.build import ShardSlice, build_zoo, prepare_zoo
from deepalign.zoo.loader import Zoo
from deepalign.zoo.plan import ZooPlan, make_plan
from deepalign.zoo.tasks import DEFAULT_TASK, TASKS, Task, get_task

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
