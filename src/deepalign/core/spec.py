"""Permutation specs: which axes of which tensors move together under one neuron permutation.

A spec maps every state-dict key to one entry per tensor axis: ``None`` (never permuted) or an
:class:`AxisPerm` naming the permutation group. ``AxisPerm.inner`` handles flattened conv maps: a
linear layer after ``Flatten`` sees ``channels * inner`` inputs, and a channel permutation moves
contiguous blocks of ``inner`` entries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from deepalign.errors import DeepAlignError

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class AxisPerm:
    """One permuted axis: the group acting on it and the block length of each neuron."""

    group: str
    inner: int = 1


@dataclass(frozen=True)
class Member:
    """A (key, axis) pair acted on by a group."""

    key: str
    axis: int
    inner: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Groups (name -> size) and, per state-dict key, the group acting on each axis."""

    groups: Mapping[str, int]
    axes: Mapping[str, tuple[AxisPerm | None, ...]]
    members: Mapping[str, tuple[Member, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members: dict[str, list[Member]] = {g: [] for g in self.groups}
        for key, entries in self.axes.items():
            for axis, entry in enumerate(entries):
                if entry is None:
                    continue
                if entry.group not in members:
                    raise DeepAlignError(
                        f"spec: key {key!r} axis {axis} names unknown group {entry.group!r}"
                    )
                members[entry.group].append(Member(key, axis, entry.inner))
        for g, ms in members.items():
            if not ms:
                raise DeepAlignError(f"spec: group {g!r} acts on no tensor")
        object.__setattr__(self, "members", {g: tuple(ms) for g, ms in members.items()})

    # -- checks -----------------------------------------------------------------------------
    def check(
        self, state: Mapping[str, Tensor], where: str = "state dict", batch_dims: int = 0
    ) -> None:
        """Raise a one-line error unless ``state`` has exactly the spec's keys and sizes."""
        missing = [k for k in self.axes if k not in state]
        extra = [k for k in state if k not in self.axes]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
            if extra:
                parts.append(f"unexpected {', '.join(extra[:4])}{' …' if len(extra) > 4 else ''}")
            raise DeepAlignError(
                f"{where}: tensors do not match the architecture ({'; '.join(parts)})"
            )
        for key, entries in self.axes.items():
            shape = tuple(state[key].shape[batch_dims:])
            if len(shape) != len(entries):
                raise DeepAlignError(
                    f"{where}: {key} has {len(shape)} dims, the architecture expects {len(entries)}"
                )
            for axis, entry in enumerate(entries):
                if entry is not None and shape[axis] != self.groups[entry.group] * entry.inner:
                    raise DeepAlignError(
                        f"{where}: {key} axis {axis} has size {shape[axis]}, expected "
                        f"{self.groups[entry.group] * entry.inner} (group {entry.group})"
                    )

    # -- description and files --------------------------------------------------------------
    def describe(self) -> list[dict]:
        """One row per group: name, size, and the axes it acts on (for ``inspect``)."""
        return [
            {
                "group": g,
                "size": size,
                "axes": [
                    f"{m.key}:{m.axis}" + (f"x{m.inner}" if m.inner > 1 else "")
                    for m in self.members[g]
                ],
            }
            for g, size in self.groups.items()
        ]

    def to_dict(self) -> dict:
        return {
            "groups": dict(self.groups),
            "axes": {
                k: [
                    None if e is None else ([e.group, e.inner] if e.inner > 1 else e.group)
                    for e in v
                ]
                for k, v in self.axes.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> PermutationSpec:
        try:
            groups = {str(g): int(n) for g, n in data["groups"].items()}
            axes = {}
            for k, v in data["axes"].items():
                entries: list[AxisPerm | None] = []
                for e in v:
                    if e is None:
                        entries.append(None)
                    elif isinstance(e, str):
                        entries.append(AxisPerm(e))
                    else:
                        entries.append(AxisPerm(str(e[0]), int(e[1])))
                axes[str(k)] = tuple(entries)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DeepAlignError(f"spec: malformed spec data ({exc})") from None
        return cls(groups, axes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PermutationSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DeepAlignError(f"spec: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def same_structure(self, other: PermutationSpec) -> bool:
        """True when both specs act on the same axes the same way, up to group names."""
        if set(self.axes) != set(other.axes):
            return False
        rename: dict[str, str] = {}
        for key, entries in self.axes.items():
            theirs = other.axes[key]
            if len(entries) != len(theirs):
                return False
            for a, b in zip(entries, theirs, strict=True):
                if (a is None) != (b is None):
                    return False
                if a is None or b is None:
                    continue
                if a.inner != b.inner or rename.setdefault(a.group, b.group) != b.group:
                    return False
        return len(set(rename.values())) == len(rename) == len(self.groups) == len(other.groups)
