"""One registry, one call signature for every alignment method.

``align(a, b, spec, method)`` returns the permutation that brings ``b`` into ``a``'s basis and an
info dict (method, objective, L2 distance, iterations, seconds, plus what the method reports).
Methods chain with ``+``: in ``"wm+sinkhorn"`` the first method's permutation is the second's
``init``; a method that also has a soft answer puts it in its info under :data:`NEXT_SCORES`, and
the next method gets it as ``init_scores`` when it takes that option (``deepalign+sinkhorn``). Methods named ``deepalign*`` live in :mod:`deepalign.nn.aligner_method`, imported on
first use (it registers them).
"""

from __future__ import annotations

import importlib
import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deepalign.core import permutation as P
from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.errors import DeepAlignError
from deepalign.solvers.objective import l2_distance, weight_inner

Solver = Callable[..., tuple[Permutation, dict[str, Any]]]
_STANDARD = ("a", "b", "spec", "module", "data", "init", "seed")
NEXT_SCORES = "next_scores"  # info key: a stage's soft scores per group, for the next stage


@dataclass(frozen=True)
class Method:
    """A registered solver: its name, whether it cannot run without data, and the function."""

    name: str
    needs_data: bool
    fn: Solver
    options: tuple[str, ...] | None  # the keyword options it accepts (None: any)
    uses_data: bool = False  # reads data when given (e.g. sinkhorn's task loss)
    # option -> (what a value must be: "number", "integer", "boolean" or "string"; None allowed)
    kinds: Mapping[str, tuple[str, bool]] = field(default_factory=dict)


def _kind(param: inspect.Parameter) -> tuple[str, bool] | None:
    """What a user-given value of this option must be (from its default and annotation), and
    whether None is allowed (only where None is the default)."""
    default, note = param.default, str(param.annotation).replace(" ", "")
    for kind, python in (("boolean", bool), ("integer", int), ("number", float), ("string", str)):
        if isinstance(default, python) or note in (python.__name__, f"{python.__name__}|None"):
            return kind, default is None
    return None


def _fits(value: Any, kind: str) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, str)


METHODS: dict[str, Method] = {}


def register(
    name: str, needs_data: bool = False, uses_data: bool | None = None
) -> Callable[[Solver], Solver]:
    """Decorator: make ``fn(a, b, spec, *, module, data, init, seed, **options)`` a method.

    ``needs_data``: it cannot run without data; ``uses_data`` (default: ``needs_data``): it reads
    data when some is given.
    """

    def wrap(fn: Solver) -> Solver:
        params = inspect.signature(fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            options = None
        else:
            options = tuple(n for n in params if n not in _STANDARD)
        kinds = {n: k for n, p in params.items() if n not in _STANDARD and (k := _kind(p))}
        uses = needs_data if uses_data is None else uses_data
        METHODS[name] = Method(name, needs_data, fn, options, uses or needs_data, kinds)
        return fn

    return wrap


def _load_builtin() -> None:
    from deepalign.solvers import am, identity, sinkhorn, wm  # noqa: F401  (they register)


def _load_deepalign() -> None:
    try:
        importlib.import_module("deepalign.nn.aligner_method")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("deepalign"):
            raise DeepAlignError(
                "method deepalign needs a trained aligner (--aligner DIR)"
            ) from None
        raise


def resolve(method: str) -> list[Method]:
    """The registered methods of ``"x"`` or a chain ``"x+y+..."``; unknown names give one line."""
    _load_builtin()
    parts = [p.strip() for p in str(method).split("+")]
    if not all(parts):
        raise DeepAlignError(f"method {method!r}: empty name in chain")
    out = []
    for name in parts:
        if name not in METHODS and name.startswith("deepalign"):
            _load_deepalign()
        if name not in METHODS:
            known = ", ".join(sorted({*METHODS, "deepalign"}))
            raise DeepAlignError(
                f"unknown method {name!r} (choose from {known}; chain with '+', e.g. wm+sinkhorn)"
            )
        out.append(METHODS[name])
    return out


def method_names() -> list[str]:
    """Every registered method name (built-ins always; deepalign ones once their module is loaded)."""
    _load_builtin()
    return sorted(METHODS)


def needs_data(method: str) -> bool:
    """Whether ``method`` (or any part of a chain) cannot run without a data set."""
    return any(m.needs_data for m in resolve(method))


def uses_data(method: str) -> bool:
    """Whether any part of ``method`` reads data when it is given."""
    return any(m.uses_data for m in resolve(method))


def check_options(method: str, options: Mapping[str, Any]) -> None:
    """Every option must be taken by some part of ``method`` and have the type that part expects
    (a number for ``lr``, an integer for ``steps``, ...); else one line naming it."""
    parts = resolve(method)
    if options and all(m.options is not None for m in parts):
        unknown = sorted(set(options) - set().union(*[set(m.options or ()) for m in parts]))
        if unknown:
            raise DeepAlignError(f"method {method!r}: unknown option(s) {', '.join(unknown)}")
    for key, value in options.items():
        for m in parts:
            kind, none_ok = m.kinds.get(key, ("", True))
            if kind and not (value is None and none_ok) and not _fits(value, kind):
                article = "an" if kind[0] in "aeiou" else "a"
                raise DeepAlignError(
                    f"method {method!r}: option {key}={value!r} must be {article} {kind}"
                )


def _check_init(
    spec: PermutationSpec, init: Mapping[str, Tensor], device: torch.device
) -> Permutation:
    if set(init) != set(spec.groups):
        raise DeepAlignError(
            f"init permutation groups {sorted(init)} do not match the architecture's {sorted(spec.groups)}"
        )
    out = {}
    for g, p in init.items():
        p = torch.as_tensor(p, dtype=torch.long)
        if p.dim() != 1 or p.numel() != spec.groups[g] or not P.is_permutation(p):
            raise DeepAlignError(
                f"init permutation for group {g!r} is not a permutation of {spec.groups[g]}"
            )
        out[g] = p.to(device)
    return out


def align(
    a: StateDict,
    b: StateDict,
    spec: PermutationSpec,
    method: str = "wm",
    *,
    module: nn.Module | None = None,
    data: Any = None,
    init: Permutation | None = None,
    seed: int = 0,
    **options: Any,
) -> tuple[Permutation, dict[str, Any]]:
    """Permutation bringing ``b`` into ``a``'s basis, and an info dict.

    ``info`` holds ``method``, ``objective`` (``sum_k <a_k, aligned b_k>``), ``objective_before``,
    ``l2`` and ``l2_before`` (weight distances), ``iterations``, ``seconds``, and each method's own
    entries (for a chain, ``parts`` lists them in order). ``options`` go to every part of a chain that
    accepts them; an option no part accepts is an error.
    """
    parts = resolve(method)
    missing = [m.name for m in parts if m.needs_data]
    if missing and data is None:
        raise DeepAlignError(
            f"method {method!r} needs data ({', '.join(missing)} uses activations or the task loss); "
            "pass a data set (--data NAME)"
        )
    spec.check(a, where="A")
    spec.check(b, where="B")
    check_options(method, options)
    device = next(iter(a.values())).device
    perm = None if init is None else _check_init(spec, init, device)
    infos = []
    start = time.perf_counter()
    scores = None
    for m in parts:
        opts = (
            options if m.options is None else {k: v for k, v in options.items() if k in m.options}
        )
        if scores is not None and m.options is not None and "init_scores" in m.options:
            opts = {**opts, "init_scores": scores}
        perm, info = m.fn(a, b, spec, module=module, data=data, init=perm, seed=seed, **opts)
        scores = info.pop(NEXT_SCORES, None)
        info = {"method": m.name, **info}
        infos.append(info)
    seconds = time.perf_counter() - start
    assert perm is not None
    perm = {g: p.to(device) for g, p in perm.items()}
    aligned = P.apply(spec, perm, b)
    out: dict[str, Any] = {}
    if len(infos) == 1:
        out.update(infos[0])
    else:
        out["parts"] = infos
    out.update(
        method=method,
        objective=weight_inner(a, aligned, spec),
        objective_before=weight_inner(a, b, spec),
        l2=l2_distance(a, aligned, spec),
        l2_before=l2_distance(a, b, spec),
        iterations=sum(int(i.get("iterations", 0)) for i in infos),
        seconds=seconds,
    )
    return perm, out
