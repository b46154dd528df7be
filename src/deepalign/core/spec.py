"""Permutation specs: which axes of which tensors move together under one neuron permutation.

A spec maps every state-dict key to one entry per tensor axis: ``None`` (never permuted), an
:class:`AxisPerm` naming the permutation group, or a :class:`Concat` of parts (a fused axis such as
attention's ``q|k|v`` rows, each part moved by its own group). ``AxisPerm.inner`` handles flattened
conv maps: a linear layer after ``Flatten`` sees ``channels * inner`` inputs, and a channel
permutation moves contiguous blocks of ``inner`` entries.

Attention heads are *structured* groups: ``heads[g] = h`` says that group ``g`` (``H * d`` units)
only takes permutations that move whole blocks of ``d`` as the head group ``h`` (``H`` units) says
and permute freely inside each block (a different permutation per head). Groups that share a head
group (queries/keys and values of one attention layer) move their heads together.
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
class Concat:
    """An axis made of consecutive parts ``(entry, length)``, each moved by its own group or none."""

    parts: tuple[tuple[AxisPerm | None, int], ...]

    @property
    def size(self) -> int:
        return sum(n for _, n in self.parts)

    def pieces(self) -> list[tuple[AxisPerm, int, int]]:
        """``(entry, start, length)`` of every permuted part."""
        out, start = [], 0
        for entry, n in self.parts:
            if entry is not None:
                out.append((entry, start, n))
            start += n
        return out


Entry = AxisPerm | Concat | None


def pieces(entry: Entry, size: int) -> list[tuple[AxisPerm, int, int]]:
    """``(AxisPerm, start, length)`` of every permuted stretch of an axis of ``size`` entries."""
    if entry is None:
        return []
    if isinstance(entry, Concat):
        return entry.pieces()
    return [(entry, 0, size)]


@dataclass(frozen=True)
class Member:
    """A (key, axis) stretch acted on by a group: entries ``start`` to ``start + length``."""

    key: str
    axis: int
    inner: int = 1
    start: int = 0
    length: int | None = None  # None: the whole axis


@dataclass(frozen=True)
class PermutationSpec:
    """Groups (name -> size) and, per state-dict key, the group acting on each axis."""

    groups: Mapping[str, int]
    axes: Mapping[str, tuple[Entry, ...]]
    heads: Mapping[str, str] = field(default_factory=dict)
    members: Mapping[str, tuple[Member, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members: dict[str, list[Member]] = {g: [] for g in self.groups}
        for key, entries in self.axes.items():
            for axis, entry in enumerate(entries):
                parts = (
                    [(e, s, n) for e, s, n in entry.pieces()]
                    if isinstance(entry, Concat)
                    else []
                    if entry is None
                    else [(entry, 0, None)]
                )
                for e, start, n in parts:
                    if e.group not in members:
                        raise DeepAlignError(
                            f"spec: key {key!r} axis {axis} names unknown group {e.group!r}"
                        )
                    members[e.group].append(Member(key, axis, e.inner, start, n))
        for g, h in self.heads.items():
            if g not in self.groups or h not in self.groups:
                raise DeepAlignError(f"spec: heads {g!r} -> {h!r} names an unknown group")
            if self.groups[g] % self.groups[h]:
                raise DeepAlignError(
                    f"spec: group {g!r} ({self.groups[g]}) is not {self.groups[h]} equal heads"
                )
        head_groups = set(self.heads.values())
        for g, ms in members.items():
            if not ms and g not in head_groups:
                raise DeepAlignError(f"spec: group {g!r} acts on no tensor")
        object.__setattr__(self, "members", {g: tuple(ms) for g, ms in members.items()})

    def head_size(self, group: str) -> int:
        """Units per head of a structured group (the group's size for an unstructured one)."""
        h = self.heads.get(group)
        return self.groups[group] // self.groups[h] if h else self.groups[group]

    def ties(self) -> dict[str, list[str]]:
        """Head group -> the structured groups whose heads it orders."""
        out: dict[str, list[str]] = {}
        for g, h in self.heads.items():
            out.setdefault(h, []).append(g)
        return out

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
                if entry is None:
                    continue
                if isinstance(entry, AxisPerm):
                    want, why = self.groups[entry.group] * entry.inner, f" (group {entry.group})"
                else:
                    for e, n in entry.parts:
                        if e is not None and n != self.groups[e.group] * e.inner:
                            raise DeepAlignError(
                                f"spec: {key} axis {axis} has a part of {n} entries for group "
                                f"{e.group} of {self.groups[e.group]} x {e.inner}"
                            )
                    want, why = entry.size, ""
                if shape[axis] != want:
                    raise DeepAlignError(
                        f"{where}: {key} axis {axis} has size {shape[axis]}, expected {want}{why}"
                    )

    # -- description and files --------------------------------------------------------------
    def describe(self) -> list[dict]:
        """One row per group: name, size, and the axes it acts on (for ``inspect``)."""
        ties = self.ties()
        rows = []
        for g, size in self.groups.items():
            row = {
                "group": g,
                "size": size,
                "axes": [
                    f"{m.key}:{m.axis}"
                    + (f"[{m.start}:{m.start + m.length}]" if m.length is not None else "")
                    + (f"x{m.inner}" if m.inner > 1 else "")
                    for m in self.members[g]
                ],
            }
            if g in self.heads:
                row["heads"] = (
                    f"{self.groups[self.heads[g]]} x {self.head_size(g)} ({self.heads[g]})"
                )
            if g in ties:
                row["orders heads of"] = ", ".join(ties[g])
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        out = {
            "groups": dict(self.groups),
            "axes": {k: [_entry_to_json(e) for e in v] for k, v in self.axes.items()},
        }
        if self.heads:
            out["heads"] = dict(self.heads)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> PermutationSpec:
        try:
            groups = {str(g): int(n) for g, n in data["groups"].items()}
            axes = {str(k): tuple(_entry_from_json(e) for e in v) for k, v in data["axes"].items()}
            heads = {str(g): str(h) for g, h in data.get("heads", {}).items()}
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise DeepAlignError(f"spec: malformed spec data ({exc})") from None
        return cls(groups, axes, heads)

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

        def same(a: AxisPerm | None, b: AxisPerm | None) -> bool:
            if a is None or b is None:
                return a is b
            return a.inner == b.inner and rename.setdefault(a.group, b.group) == b.group

        for key, entries in self.axes.items():
            theirs = other.axes[key]
            if len(entries) != len(theirs):
                return False
            for a, b in zip(entries, theirs, strict=True):
                if isinstance(a, Concat) or isinstance(b, Concat):
                    if not (isinstance(a, Concat) and isinstance(b, Concat)):
                        return False
                    if len(a.parts) != len(b.parts) or not all(
                        na == nb and same(ea, eb)
                        for (ea, na), (eb, nb) in zip(a.parts, b.parts, strict=True)
                    ):
                        return False
                elif not same(a, b):
                    return False
        for g, h in self.heads.items():  # a head group acting on no tensor is named only here
            if (
                rename.get(g) not in other.heads
                or rename.setdefault(h, other.heads[rename[g]]) != (other.heads[rename[g]])
            ):
                return False
        return len(set(rename.values())) == len(rename) == len(self.groups) == len(
            other.groups
        ) and len(self.heads) == len(other.heads)


def _entry_to_json(e: Entry) -> object:
    if e is None:
        return None
    if isinstance(e, Concat):
        return {"cat": [[_entry_to_json(p), n] for p, n in e.parts]}
    return [e.group, e.inner] if e.inner > 1 else e.group


def _entry_from_json(e: object) -> Entry:
    if e is None:
        return None
    if isinstance(e, str):
        return AxisPerm(e)
    if isinstance(e, dict):
        return Concat(tuple((_entry_from_json(p), int(n)) for p, n in e["cat"]))  # type: ignore[misc]
    return AxisPerm(str(e[0]), int(e[1]))  # type: ignore[index]
