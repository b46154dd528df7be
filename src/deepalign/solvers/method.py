"""What a solver declares about itself: the :class:`Method` record and typed :class:`Options`.

Every solver module ends with one ``METHOD = Method(...)``: its name, its per-pair function, its
options as a frozen dataclass (names, types and defaults in one place, shared by the per-pair and
the batched form), an optional batched function, and what it needs (data, an aligner, a previous
stage's soft scores). :mod:`deepalign.solvers.registry` lists them; :mod:`deepalign.solvers.chain`
runs them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from deepalign.core.permutation import Permutation
from deepalign.errors import DeepAlignError

Solver = Callable[..., tuple[Permutation, dict[str, Any]]]
BatchSolver = Callable[..., tuple[Permutation, list[dict[str, Any]]]]
NEXT_SCORES = "next_scores"  # info key: a stage's soft scores per group, for the next stage

_KINDS: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _fits(value: Any, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, int | float) and math.isfinite(value)
    if kind == "string":
        return isinstance(value, str)
    return True  # other types (lists, tensors): checked by the solver


def _kind(annotation: Any) -> tuple[str, bool]:
    """``(kind, None allowed)`` of a field annotation such as ``int`` or ``float | None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        none_ok = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _KINDS.get(rest[0], "any"), none_ok
        return "any", none_ok
    return _KINDS.get(annotation, "any"), False


@dataclass(frozen=True)
class Options:
    """Base of every solver's options dataclass: typed fields with defaults, checked on the way in."""

    solver: ClassVar[str] = "solver"

    @classmethod
    def kinds(cls) -> dict[str, tuple[str, bool]]:
        """Each option's kind (``"number"``, ``"integer"``, ``"boolean"``, ``"string"``, ``"any"``)
        and whether None is allowed."""
        hints = typing.get_type_hints(cls)
        return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def check(cls, values: Mapping[str, Any], where: str | None = None) -> None:
        """One-line errors for an unknown option or a value of the wrong type."""
        kinds = cls.kinds()
        label = where or cls.solver
        for key, value in values.items():
            if key not in kinds:
                known = ", ".join(kinds) or "none"
                raise DeepAlignError(f"{label}: unknown option {key!r} (options: {known})")
            kind, none_ok = kinds[key]
            if value is None and none_ok:
                continue
            if not _fits(value, kind):
                article = "an" if kind[0] in "aeiou" else "a"
                raise DeepAlignError(f"{label}: option {key}={value!r} must be {article} {kind}")

    @classmethod
    def make(cls, base: Options | None = None, **values: Any) -> Any:
        """``base`` (default: the defaults) with ``values`` replacing fields, after :meth:`check`."""
        cls.check(values)
        return dataclasses.replace(base if base is not None else cls(), **values)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class NoOptions(Options):
    """A solver without options."""


@dataclass(frozen=True)
class Method:
    """A solver as the registry lists it.

    ``solve(a, b, spec, *, module, data, init, seed, **options)`` aligns one pair; ``solve_batch``
    (optional) takes N stacked pairs and ``pair_seeds`` and returns ``(perm (N, n), [info per
    pair])``, ``batch_chunk`` pairs per call. ``needs_aligner`` stages get ``aligner=``;
    ``takes_scores`` stages get the previous stage's soft answer as ``init_scores=``.
    """

    name: str
    solve: Solver
    options: type[Options] = NoOptions
    solve_batch: BatchSolver | None = None
    batch_chunk: int = 0
    needs_data: bool = False
    uses_data: bool = False
    needs_aligner: bool = False
    takes_scores: bool = False
    reports_progress: bool = False  # takes progress=callable(done, total)
    help: str = ""

    def __post_init__(self) -> None:
        if self.needs_data and not self.uses_data:
            object.__setattr__(self, "uses_data", True)
