"""The alignment methods, listed explicitly: every name a chain, the CLI or the bench can use.

Each solver module declares its :class:`~deepalign.solvers.method.Method` as ``METHOD``; this list
is the one place that collects them. A new solver is a module with a ``METHOD`` and one line here
(or, from outside the package, :func:`add`).
"""

from __future__ import annotations

from deepalign.errors import DeepAlignError
from deepalign.solvers import am, deepalign, identity, sinkhorn, wm
from deepalign.solvers.method import Method

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        identity.METHOD,
        wm.METHOD,
        am.METHOD,
        sinkhorn.METHOD,
        sinkhorn.PAPER_METHOD,
        deepalign.METHOD,
    )
}


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in METHODS:
        raise DeepAlignError(
            f"unknown method {name!r} (choose from {', '.join(sorted(METHODS))}; "
            "chain with '+', e.g. wm+sinkhorn)"
        )
    return METHODS[name]


def add(method: Method) -> Method:
    """Register a solver of one's own (its name must be new); returns it."""
    if method.name in METHODS:
        raise DeepAlignError(f"method {method.name!r} already exists")
    if "+" in method.name or not method.name.strip():
        raise DeepAlignError(f"method name {method.name!r}: must be non-empty and without '+'")
    METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    """Every registered method name."""
    return sorted(METHODS)
