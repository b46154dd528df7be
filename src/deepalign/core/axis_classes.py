"""Classes of tensor axes that must move together, and the permutation spec they make.

Every activation axis ``("t", node, dim)``, state axis ``("p", key, dim)`` and virtual axis
``("v", name, dim)`` (an activation inside a leaf module) is an element of a union-find. Three
relations are recorded:

- a *link* ``b = a`` with each neuron a block of ``factor`` entries (the classes of a union-find
  with block factors, so ``Flatten(C, H, W)`` ties channels to blocks of ``H * W`` inputs);
- a *join*: an axis that is the concatenation of parts (``torch.cat``, ``chunk``, a fused
  ``q|k|v`` projection); each part keeps its own class;
- a *head split*: an axis of ``H * d`` units viewed as ``(H, d)`` (attention heads). Splits whose
  ``d`` axes meet (``q @ k^T`` contracts them) belong to one structured group; splits whose ``H``
  axes meet (the scores' heads meet the values' heads) share one head order.

Safe by default: an axis touching the graph's inputs or outputs, or a relation that does not add up,
fixes the class. A head split whose within-head axis meets anything fixed or any weight falls back
to moving whole heads only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from torch import Tensor

from deepalign.core.spec import AxisPerm, Concat, PermutationSpec

Elem = tuple[str, str, int]


@dataclass(frozen=True)
class HeadSplit:
    """``whole`` (``H * d`` units) viewed as ``head`` (``H``) by ``within`` (``d``), row-major."""

    whole: Elem
    head: Elem
    within: Elem


@dataclass(frozen=True)
class Join:
    """``whole`` is the concatenation of ``parts`` along one axis."""

    whole: Elem
    parts: tuple[Elem, ...]


@dataclass(frozen=True)
class Choice:
    """Two readings of one reshape, settled once every op is linked: when ``pivot`` is fixed (a
    fused ``q|k|v`` axis taken apart), the ``join`` and ``splits``; else the block ``link``."""

    pivot: Elem
    link: tuple[Elem, Elem, int]
    join: Join
    splits: tuple[HeadSplit, ...]


class AxisClasses:
    """Union-find over axes; ``weight(x) / weight(root)`` is x's block length relative to the root."""

    def __init__(self) -> None:
        self.parent: dict[Elem, Elem] = {}
        self.ratio: dict[Elem, Fraction] = {}
        self.fixed: set[Elem] = set()
        self.joins: list[Join] = []
        self.splits: list[HeadSplit] = []
        self.choices: list[Choice] = []

    def find(self, x: Elem) -> tuple[Elem, Fraction]:
        if x not in self.parent:
            self.parent[x], self.ratio[x] = x, Fraction(1)
        path = []
        while self.parent[x] != x:
            path.append(x)
            x = self.parent[x]
        acc = Fraction(1)
        for p in reversed(path):  # compress, accumulating ratios from the root down
            acc *= self.ratio[p]
            self.parent[p], self.ratio[p] = x, acc
        return x, (self.ratio[path[0]] if path else Fraction(1))

    def root(self, x: Elem) -> Elem:
        return self.find(x)[0]

    def union(self, a: Elem, b: Elem, factor: int | Fraction = 1) -> bool:
        """``b`` is ``a`` with each neuron a block of ``factor``; True when two classes merged."""
        (ra, wa), (rb, wb) = self.find(a), self.find(b)
        if ra == rb:
            if wb != wa * factor:  # two different block structures: refuse to permute
                self.fixed.add(ra)
            return False
        self.parent[rb], self.ratio[rb] = ra, wa * factor / wb
        return True

    # -- joins and head splits ------------------------------------------------------------------
    def resolve(self, size: Callable[[Elem], int]) -> None:
        """Settle joins and head splits: merge what they imply, fall back where they cannot hold."""
        for c in self.choices:
            if self.root(c.pivot) in self._fixed_roots():
                self.joins.append(c.join)
                self.splits.extend(c.splits)
            else:
                self.union(*c.link)
        while True:
            changed = self._merge_implied()
            is_fixed = self._fixed_roots()
            heavy = {self.root(e) for e in self.parent if e[0] == "p"}
            keep = []
            for s in self.splits:
                if self.root(s.within) in is_fixed or self.root(s.within) in heavy:
                    d = size(s.within)  # within-head order is pinned: move whole heads only
                    changed |= self.union(s.head, s.whole, d)
                    self.fixed.add(s.within)
                else:
                    keep.append(s)
            self.splits = keep
            if not changed:
                break
        self._propagate_fixed(size)

    def _merge_implied(self) -> bool:
        changed, again = False, True
        while again:
            again = False
            by_within: dict[Elem, HeadSplit] = {}
            by_whole: dict[Elem, HeadSplit] = {}
            for s in self.splits:
                for table, key in (
                    (by_within, self.root(s.within)),
                    (by_whole, self.root(s.whole)),
                ):
                    first = table.setdefault(key, s)
                    if first is not s:
                        for x, y in ((first.whole, s.whole), (first.head, s.head)):
                            again |= self.union(x, y)
                        again |= self.union(first.within, s.within)
            by_join: dict[Elem, Join] = {}
            for j in self.joins:
                first = by_join.setdefault(self.root(j.whole), j)
                if first is not j and len(first.parts) == len(j.parts):
                    for x, y in zip(first.parts, j.parts, strict=True):
                        again |= self.union(x, y)
            changed |= again
        return changed

    def _fixed_roots(self) -> set[Elem]:
        return {self.root(e) for e in self.fixed}

    def _propagate_fixed(self, size: Callable[[Elem], int]) -> None:
        """A fixed whole fixes its parts and heads; fixed heads fix their wholes; odd shapes fix."""
        while True:
            fixed = self._fixed_roots()
            before = len(fixed)
            wholes = {self.root(j.whole) for j in self.joins}
            by_root: dict[Elem, list[Join]] = {}
            for j in self.joins:
                by_root.setdefault(self.root(j.whole), []).append(j)
            for root, js in by_root.items():
                sizes = {tuple(size(p) for p in j.parts) for j in js}
                if len(sizes) != 1 or sum(next(iter(sizes))) != size(js[0].whole):
                    self.fixed.add(root)
                if root in fixed or root in {self.root(s.whole) for s in self.splits}:
                    self.fixed.update(p for j in js for p in j.parts)
                    self.fixed.add(root)
                for j in js:  # a part that is itself a join, or the whole again: leave alone
                    self.fixed.update(p for p in j.parts if self.root(p) in wholes)
            heads = {self.root(s.head) for s in self.splits}
            whole = {self.root(s.whole) for s in self.splits}
            shapes: dict[Elem, set[tuple[int, int]]] = {}  # one (H, d) per structured class
            for s in self.splits:
                shapes.setdefault(self.root(s.whole), set()).add((size(s.head), size(s.within)))
            odd = {r for r, hd in shapes.items() if len(hd) > 1}  # e.g. 4 and 2 groups at once
            for s in self.splits:
                roots = {self.root(s.whole), self.root(s.head), self.root(s.within)}
                if (
                    roots & fixed
                    or len(roots) < 3
                    or size(s.whole) != size(s.head) * size(s.within)
                    or self.root(s.within) in heads | whole  # e.g. (H, d) read back as (d, H)
                    or self.root(s.head) in whole
                    or self.root(s.whole) in odd
                ):
                    self.fixed.update((s.whole, s.head, s.within))
            if len(self._fixed_roots()) == before:
                break
        fixed = self._fixed_roots()
        self.splits = [s for s in self.splits if self.root(s.whole) not in fixed]


def build_spec(
    state: Mapping[str, Tensor], classes: AxisClasses, size: Callable[[Elem], int]
) -> tuple[PermutationSpec, dict[str, list[Elem]]]:
    """The spec of the resolved classes, and per group its axes of one neuron per entry."""
    fixed = classes._fixed_roots()
    members: dict[Elem, list[tuple[Elem, Fraction]]] = {}
    for e in list(classes.parent):
        root, w = classes.find(e)
        members.setdefault(root, []).append((e, w))
    composite = {classes.root(j.whole): j for j in classes.joins}
    in_parts = {classes.root(p) for r, j in composite.items() if r not in fixed for p in j.parts}
    head_of = {classes.root(s.whole): classes.root(s.head) for s in classes.splits}
    head_classes = set(head_of.values())
    within = {classes.root(s.within) for s in classes.splits}
    order = {k: i for i, k in enumerate(state)}

    # one group per class that moves weights (directly, through a join, or as a head order)
    found: dict[Elem, tuple[int, Fraction, list[tuple[str, int, int]], list[Elem]]] = {}
    for root, ms in members.items():
        if root in fixed or root in composite or root in within:
            continue
        params = [(e, w) for e, w in ms if e[0] == "p"]
        if not (params or root in in_parts or root in head_classes):
            continue
        if params and len(params) == len(ms) and root not in in_parts:
            continue  # tied weights that no activation sees
        base = min(w for _, w in ms)
        sizes = {Fraction(size(e)) * base / w for e, w in ms}
        n = next(iter(sizes))
        if (
            len(sizes) != 1
            or n.denominator != 1
            or any((w / base).denominator != 1 for _, w in params)
        ):
            classes.fixed.add(root)
            continue
        params.sort(key=lambda m: (order[m[0][1]], m[0][2]))
        whole = [e for e, w in ms if w == base]
        found[root] = (int(n), base, [(k, d, int(w / base)) for (_, k, d), w in params], whole)

    for whole, head in head_of.items():  # a head order that is no group pins its groups
        if whole in found and head not in found:
            del found[whole]
            classes.fixed.add(whole)

    # the axes of every composite class: a Concat of its parts' groups
    cat_entries: dict[tuple[str, int], list[tuple[Elem | None, Fraction, int]]] = {}
    for root, j in composite.items():
        if root in fixed:
            continue
        _, w_whole = classes.find(j.whole)
        for (kind, key, d), w in members[root]:
            if kind != "p":
                continue
            r = w / w_whole
            parts = []
            for p in j.parts:
                pr, wp = classes.find(p)
                length = size(p) * r
                if pr not in found or length.denominator != 1:
                    parts.append((None, Fraction(1), int(length)))
                else:
                    parts.append((pr, wp / found[pr][1] * r, int(length)))
            cat_entries[(key, d)] = parts

    def sort_key(root: Elem) -> tuple:
        params = found[root][2]
        if params:
            return (0, order[params[0][0]], params[0][1])
        firsts = [
            order[k] for (k, _), parts in cat_entries.items() if any(p[0] == root for p in parts)
        ]
        return (0, min(firsts), 0) if firsts else (1, 0, 0)

    names: dict[Elem, str] = {}
    groups: dict[str, int] = {}
    for root in sorted((r for r in found if r not in head_classes), key=sort_key):
        names[root] = _unique(_group_name(found[root][2], cat_entries, root, members), groups)
        groups[names[root]] = found[root][0]
    heads: dict[str, str] = {}
    for whole in list(names):  # head groups in the order of the first group whose heads they order
        h = head_of.get(whole)
        if h is None or h not in found or h in names:
            continue
        owners = [names[w] for w, hh in head_of.items() if hh == h and w in names]
        own = [e[1] for e, _ in members[h] if e[0] == "v"]
        names[h] = _unique(own[0] if own else f"{owners[0]}.heads", groups)
        groups[names[h]] = found[h][0]
        heads.update({o: names[h] for o in owners})

    entries: dict[tuple[str, int], AxisPerm | Concat] = {}
    for root, (_, _, params, _) in found.items():
        for k, d, inner in params:
            entries[(k, d)] = AxisPerm(names[root], inner)
    for (k, d), parts in cat_entries.items():
        cat = []
        for pr, inner, length in parts:
            ok = pr is not None and inner.denominator == 1
            cat.append((AxisPerm(names[pr], int(inner)) if ok else None, length))
        if any(e is not None for e, _ in cat):
            entries[(k, d)] = Concat(tuple(cat))
    spec_axes = {k: tuple(entries.get((k, d)) for d in range(v.dim())) for k, v in state.items()}
    acted = {
        e.group
        for v in spec_axes.values()
        for entry in v
        if entry is not None
        for e in ([entry] if isinstance(entry, AxisPerm) else [p for p, _ in entry.parts if p])
    }
    heads = {g: h for g, h in heads.items() if g in acted}
    groups = {g: n for g, n in groups.items() if g in acted or g in heads.values()}
    spec = PermutationSpec(groups, spec_axes, heads)
    return spec, {names[r]: found[r][3] for r in found if names.get(r) in groups}


def _unique(base: str, taken: Mapping[str, int]) -> str:
    name, i = base, 2
    while name in taken:
        name, i = f"{base}#{i}", i + 1
    return name


def _group_name(
    params: list[tuple[str, int, int]],
    cat_entries: Mapping[tuple[str, int], list[tuple[Elem | None, Fraction, int]]],
    root: Elem,
    members: Mapping[Elem, list[tuple[Elem, Fraction]]],
) -> str:
    """A leaf module's own name for its inner activations (``self_attn.qk``); else ``<module>.out``
    for the first tensor whose axis 0 the group acts on; else ``<module>.out[i]`` for part ``i`` of
    a fused axis (``qkv.out[0,1]``: queries and keys); else ``<key>:<axis>``."""
    virtual = [e[1] for e, _ in members[root] if e[0] == "v"]
    if virtual:
        return virtual[0]
    rows = [k for k, a, _ in params if a == 0]
    if rows:
        return f"{rows[0].rpartition('.')[0] or rows[0]}.out"
    for (k, d), parts in cat_entries.items():
        at = ",".join(str(i) for i, (pr, _, _) in enumerate(parts) if pr == root)
        if at:
            return f"{k.rpartition('.')[0] or k}.out[{at}]" if d == 0 else f"{k}:{d}[{at}]"
    return f"{params[0][0]}:{params[0][1]}" if params else "group"
