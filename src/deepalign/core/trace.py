"""Derive a permutation spec from any traceable module with torch.fx.

Every tensor axis of the traced graph, ``(node, dim)``, and every state-dict axis, ``(key, dim)``,
is an element of a union-find. One handler per op (registered by module class, function, or method
name) *links* the axes the op is permutation-equivariant on; a link carries a multiplicative block
factor, so ``Flatten(C, H, W) -> C*H*W`` ties the channel axis to blocks of ``H*W`` inputs (the
``inner`` of :class:`~deepalign.core.spec.AxisPerm`). Safe by default: every axis of an op's inputs
and output that its handler neither links nor declares invariant (``free``, e.g. a reduced axis) is
*fixed*, as are the graph's inputs and outputs. A class that holds a state axis and an activation
axis and no fixed axis is one permutation group. An op without a handler is an error, never a guess.

Adding an op is a few local lines::

    @handles(nn.Softplus, "softplus")
    def _(op):
        op.pointwise()
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from deepalign.core.layers import Sine
from deepalign.core.spec import AxisPerm, PermutationSpec
from deepalign.errors import DeepAlignError

# ("t", node name, dim) for an activation axis, ("p", state key, dim) for a parameter/buffer axis
Elem = tuple[str, str, int]
Handler = Callable[["Op"], None]

_MODULES: dict[type, Handler] = {}
_FUNCTIONS: dict[Any, Handler] = {}
_METHODS: dict[str, Handler] = {}


def handles(*keys: type | str | Callable) -> Callable[[Handler], Handler]:
    """Register a handler for module classes, method names (str) and functions."""

    def register(fn: Handler) -> Handler:
        for k in keys:
            table = (
                _MODULES if isinstance(k, type) else _METHODS if isinstance(k, str) else _FUNCTIONS
            )
            table[k] = fn
        return fn

    return register


def _shape(node: Any) -> tuple[int, ...] | None:
    """The shape of a node's tensor output (None for non-tensors and tuples)."""
    return node.meta.get("shape") if isinstance(node, fx.Node) else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(
        (node.args, node.kwargs), lambda n: found.append(n) if _shape(n) is not None else None
    )
    return list(dict.fromkeys(found))


class Op:
    """One graph node as a handler sees it: its tensor inputs, output, module and arguments."""

    def __init__(self, node: fx.Node, module: nn.Module | None, state_keys: set[str]) -> None:
        self.node, self.module, self.state_keys = node, module, state_keys
        self.ins = _tensor_args(node)
        self.out_shape = _shape(node)
        self.links: list[tuple[Elem, Elem, int]] = []
        self.free: set[Elem] = set()

    # -- addressing -----------------------------------------------------------------------------
    def x(self, i: int, dim: int) -> Elem:
        """Axis ``dim`` of tensor input ``i``."""
        return ("t", self.ins[i].name, dim % len(_shape(self.ins[i])))

    def y(self, dim: int) -> Elem:
        """Axis ``dim`` of the output."""
        return ("t", self.node.name, dim % len(self.out_shape))

    def param(self, name: str, dim: int) -> Elem | None:
        """Axis ``dim`` of the module's state entry ``name`` (None when the module has none)."""
        key = f"{self.node.target}.{name}"
        return ("p", key, dim) if key in self.state_keys else None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        a = self.node.args
        return a[index] if len(a) > index else self.node.kwargs.get(name, default)

    # -- building blocks ------------------------------------------------------------------------
    def link(self, a: Elem | None, b: Elem | None, factor: int = 1) -> None:
        """``b`` is ``a`` with each neuron a block of ``factor`` entries."""
        if a is not None and b is not None:
            self.links.append((a, b, factor))

    def pointwise(self) -> None:
        """Elementwise op with broadcasting: equal-size axes of every tensor input join the output's."""
        n = len(self.out_shape)
        for i, t in enumerate(self.ins):
            shape = _shape(t)
            for d, size in enumerate(shape):
                od = d + n - len(shape)
                if size == self.out_shape[od]:
                    self.link(self.x(i, d), self.y(od))
                # a broadcast size-1 axis stays unlinked (and fixed): permuting size 1 is a no-op

    def leading(self, k: int) -> None:
        """Input 0 and the output share all axes before the last ``k`` (batch and the like)."""
        for d in range(len(self.out_shape) - k):
            self.link(self.x(0, d), self.y(d))

    def reshaped(self) -> None:
        """Input 0 reshaped row-major into the output: merged runs of axes map onto blocks."""
        for ins, outs in _segments(_shape(self.ins[0]), self.out_shape):
            a, b = [_shape(self.ins[0])[d] for d in ins], [self.out_shape[d] for d in outs]
            big_a, big_b = (
                [d for d, s in zip(ins, a, strict=True) if s != 1],
                [d for d, s in zip(outs, b, strict=True) if s != 1],
            )
            if len(big_a) == len(big_b) == 1:
                self.link(self.x(0, big_a[0]), self.y(big_b[0]))
                continue
            block_a, block_b = prod(a[1:]), prod(b[1:])
            if block_a % block_b == 0:
                self.link(self.x(0, ins[0]), self.y(outs[0]), block_a // block_b)
            elif block_b % block_a == 0:
                self.link(self.y(outs[0]), self.x(0, ins[0]), block_b // block_a)


def _segments(a: tuple[int, ...], b: tuple[int, ...]) -> Iterable[tuple[list[int], list[int]]]:
    """Split two shapes of one tensor into minimal runs of axes with equal products."""
    i = j = 0
    while i < len(a) and j < len(b):
        ins, outs, pa, pb = [i], [j], a[i], b[j]
        while pa != pb:
            if pa < pb and i + 1 < len(a):
                i += 1
                ins.append(i)
                pa *= a[i]
            elif j + 1 < len(b):
                j += 1
                outs.append(j)
                pb *= b[j]
            else:
                return
        yield ins, outs
        i, j = i + 1, j + 1


# -- handlers -------------------------------------------------------------------------------------
_ACTS = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus)
_ACT_FNS = (F.relu, F.gelu, F.silu, F.leaky_relu, F.elu, F.softplus, F.sigmoid, F.tanh, F.dropout)
_ACT_NAMES = ("relu", "sigmoid", "tanh", "sin", "cos", "exp", "abs", "neg", "square")


@handles(
    *_ACTS,
    Sine,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
    nn.Softmax,
    nn.LogSoftmax,
    *_ACT_FNS,
    *(getattr(torch, n) for n in _ACT_NAMES),
    *_ACT_NAMES,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.clamp,
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    "add",
    "sub",
    "mul",
    "div",
    "clamp",
    "softmax",
    "log_softmax",
    "contiguous",
    "clone",
    "detach",
    "float",
)
def _pointwise(op: Op) -> None:
    op.pointwise()  # softmax too: it is equivariant along every axis, including its own


@handles(nn.Linear, F.linear)
def _linear(op: Op) -> None:
    op.leading(1)
    if op.module is not None:
        w, b = op.param("weight", 0), op.param("bias", 0)
        op.link(op.x(0, -1), op.param("weight", 1))
    else:  # F.linear(x, weight, bias): the weight and bias are graph nodes
        w, b = op.x(1, 0), op.x(2, 0) if len(op.ins) > 2 else None
        op.link(op.x(0, -1), op.x(1, 1))
    op.link(op.y(-1), w)
    op.link(op.y(-1), b)


@handles(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(op: Op) -> None:
    if op.module.groups != 1:
        raise DeepAlignError(
            f"trace: {type(op.module).__name__} {op.node.target!r} has groups={op.module.groups}; "
            "only groups=1 is supported"
        )
    k = op.module.weight.dim() - 1  # channels and the spatial axes, counted from the end
    op.leading(k)
    op.link(op.x(0, -k), op.param("weight", 1))
    op.link(op.y(-k), op.param("weight", 0))
    op.link(op.y(-k), op.param("bias", 0))


@handles(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batchnorm(op: Op) -> None:
    op.pointwise()
    for name in ("weight", "bias", "running_mean", "running_var"):
        op.link(op.y(1), op.param(name, 0))


@handles(nn.LayerNorm)
def _layernorm(op: Op) -> None:
    op.pointwise()  # normalising over axes is invariant to permuting them
    k = len(op.module.normalized_shape)
    for d in range(k):
        op.link(op.y(d - k), op.param("weight", d))
        op.link(op.y(d - k), op.param("bias", d))


@handles(
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
)
def _pool2d(op: Op) -> None:
    op.leading(2)


@handles(
    nn.Flatten,
    nn.Unflatten,
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    "flatten",
    "view",
    "reshape",
    "squeeze",
    "unsqueeze",
)
def _reshape(op: Op) -> None:
    op.reshaped()


@handles(torch.transpose, "transpose", "permute")
def _transpose(op: Op) -> None:
    n = len(op.out_shape)
    if op.node.target == "permute":
        rest = op.node.args[1:]
        order = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        order = order or op.node.kwargs["dims"]
    else:
        order = list(range(n))
        d0, d1 = op.arg(1, "dim0") % n, op.arg(2, "dim1") % n
        order[d0], order[d1] = order[d1], order[d0]
    for d, src in enumerate(order):
        op.link(op.x(0, src), op.y(d))


@handles(torch.mean, torch.sum, torch.amax, "mean", "sum", "amax")
def _reduce(op: Op) -> None:
    shape = _shape(op.ins[0])
    dims = op.arg(1, "dim")
    dims = range(len(shape)) if dims is None else [dims] if isinstance(dims, int) else dims
    dims = {d % len(shape) for d in dims}
    keep = op.arg(2, "keepdim", False)
    kept = [d for d in range(len(shape)) if keep or d not in dims]
    for od, d in enumerate(kept):
        if d not in dims:
            op.link(op.x(0, d), op.y(od))
    op.free |= {op.x(0, d) for d in dims}  # a sum over a permuted axis is invariant


@handles(torch.cat, torch.concat)
def _cat(op: Op) -> None:
    dim = op.arg(1, "dim", 0) % len(op.out_shape)
    for i in range(len(op.ins)):
        for d in range(len(op.out_shape)):
            if d != dim:  # the concatenated axis stays fixed
                op.link(op.x(i, d), op.y(d))


@handles("size", "dim")
def _size(op: Op) -> None:
    op.free |= {op.x(0, d) for d in range(len(_shape(op.ins[0])))}


@handles(getattr)
def _getattr(op: Op) -> None:
    if op.node.args[1] not in ("shape", "dtype", "device", "ndim"):
        raise _unknown(op.node, f"attribute .{op.node.args[1]}")
    _size(op)


# -- union-find with block factors ----------------------------------------------------------------
class _Axes:
    """Union-find over axes; ``weight(x) / weight(root)`` is x's block length relative to the root."""

    def __init__(self) -> None:
        self.parent: dict[Elem, Elem] = {}
        self.ratio: dict[Elem, Fraction] = {}
        self.fixed: set[Elem] = set()

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

    def union(self, a: Elem, b: Elem, factor: int) -> None:
        (ra, wa), (rb, wb) = self.find(a), self.find(b)
        if ra == rb:
            if wb != wa * factor:  # two different block structures: refuse to permute
                self.fixed.add(ra)
            return
        self.parent[rb], self.ratio[rb] = ra, wa * factor / wb


def _unknown(node: fx.Node, what: str) -> DeepAlignError:
    return DeepAlignError(
        f"trace: no permutation rule for {what} (fx node {node.name!r}); "
        "register one with deepalign.core.trace.handles"
    )


def _describe_target(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module":
        return f"module {type(module).__name__} {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    name = getattr(node.target, "__name__", str(node.target))
    where = getattr(node.target, "__module__", None) or "torch"
    return f"function {where}.{name}"


def _handler(node: fx.Node, module: nn.Module | None) -> Handler | None:
    if node.op == "call_module":
        return _MODULES.get(type(module))
    if node.op == "call_method":
        return _METHODS.get(node.target)
    try:
        return _FUNCTIONS.get(node.target)
    except TypeError:  # unhashable target
        return None


class _Tracer(fx.Tracer):
    """Keeps every module with a handler as one leaf node (torch's own modules are leaves anyway)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _MODULES or super().is_leaf_module(m, qualname)


class _Shapes(fx.Interpreter):
    """Runs the graph once, recording each node's output shape (``None`` for non-tensors)."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001  (reported as one line naming the node)
            raise DeepAlignError(f"fails at fx node {n.name!r} ({_first_line(exc)})") from None
        n.meta["shape"] = tuple(result.shape) if isinstance(result, Tensor) else None
        return result


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0][:160] if lines else ''}"


def _trace(model: nn.Module, inputs: tuple[Tensor, ...]) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001  (any tracing failure is one user-facing line)
        raise DeepAlignError(
            f"trace: {type(model).__name__} is not traceable with torch.fx ({_first_line(exc)})"
        ) from None
    gm = fx.GraphModule(model, graph)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # BatchNorm must not update its running stats, dropout must not fire
    try:
        with torch.no_grad():
            shapes = _Shapes(gm)
            shapes.extra_traceback = False
            shapes.run(*inputs)
    except DeepAlignError as exc:
        shown = ", ".join(str(tuple(t.shape)) if isinstance(t, Tensor) else "?" for t in inputs)
        raise DeepAlignError(
            f"trace: the example input of shape {shown} does not run "
            f"through {type(model).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    finally:
        for m, training in modes.items():
            m.training = training
    return gm


def spec_from_model(
    model: nn.Module, example_input: Tensor | tuple[Tensor, ...]
) -> PermutationSpec:
    """The permutation spec of ``model``, derived by tracing it on ``example_input`` with torch.fx.

    ``example_input`` is one batch (a tuple for a model with several inputs); only its shapes
    matter. Tied tensors (one parameter under two names) move together.

    Raises a one-line :class:`DeepAlignError` for a model torch.fx cannot trace, or one that uses an
    op without a permutation rule (the message names the op and the fx node).
    """
    return trace_model(model, example_input).spec


@dataclass(frozen=True)
class Traced:
    """A traced model: its spec, and per group the activation it can be observed on.

    ``probes[group] = (node, dim)``: the first output of a nonlinearity (in graph order) that
    carries the group's neurons on axis ``dim`` (activation matching correlates these); groups
    never followed by one are absent.
    """

    spec: PermutationSpec
    graph: fx.GraphModule
    probes: dict[str, tuple[str, int]]

    def activations(
        self, model: nn.Module, state: Mapping[str, Tensor], x: Tensor | tuple[Tensor, ...]
    ) -> dict[str, Tensor]:
        """Per probed group, ``(samples, n)`` activations of ``model`` with weights ``state`` on
        ``x``: the group's axis last, every other axis (batch, positions) a sample."""
        gm = fx.GraphModule(model, self.graph.graph)
        gm.load_state_dict(dict(state))
        want = {node: (g, d) for g, (node, d) in self.probes.items()}
        seen: dict[str, Tensor] = {}

        class _Grab(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if n.name in want:
                    g, d = want[n.name]
                    seen[g] = out.movedim(d, -1).reshape(-1, out.shape[d])
                return out

        inputs = x if isinstance(x, tuple) else (x,)
        with torch.no_grad():
            _Grab(gm.eval()).run(*inputs)
        return seen


def trace_model(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> Traced:
    """:func:`spec_from_model` and the activation probes of every group (see :class:`Traced`)."""
    state = model.state_dict()
    keys = set(state)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    gm = _trace(model, inputs)
    axes = _Axes()
    tied: dict[tuple, str] = {}
    for key, t in state.items():  # one storage under two names: same permutation on both
        first = tied.setdefault((t.data_ptr(), t.shape, t.stride()), key) if t.numel() else key
        if first != key:
            for d in range(t.dim()):
                axes.union(("p", first, d), ("p", key, d), 1)

    def tensor_axes(n: fx.Node) -> list[Elem]:
        shape = _shape(n)
        return [("t", n.name, d) for d in range(len(shape or ()))]

    nonlinear: list[str] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            nodes = [node] if node.op == "placeholder" else _tensor_args(node)
            axes.fixed.update(e for n in nodes for e in tensor_axes(n))
            continue
        if node.op == "get_attr":
            in_state = node.target in keys  # a constant that is not in the state dict stays fixed
            links = (
                [(e, ("p", node.target, e[2]), 1) for e in tensor_axes(node)] if in_state else []
            )
            touched, free = tensor_axes(node), set()
        else:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            op = Op(node, module, keys)
            touched = [e for n in (*op.ins, node) for e in tensor_axes(n)]
            if not touched:
                continue  # pure Python on sizes: cannot move any neuron
            handler = _handler(node, module)
            if handler is None:
                raise _unknown(node, _describe_target(node, module))
            handler(op)
            if _is_nonlinear(node, module):
                nonlinear.append(node.name)
            links, free = op.links, op.free
        linked = set()
        for a, b, factor in links:
            axes.union(a, b, factor)
            linked |= {a, b}
        axes.fixed.update(e for e in touched if e not in linked and e not in free)
    spec, members = _assemble(state, axes, {n.name: _shape(n) for n in gm.graph.nodes})
    probes = {}
    for group, elems in members.items():
        for name in nonlinear:
            dims = [d for kind, node, d in elems if kind == "t" and node == name]
            if dims:
                probes[group] = (name, dims[0])
                break
    return Traced(spec, gm, probes)


def _is_nonlinear(node: fx.Node, module: nn.Module | None) -> bool:
    """A pointwise nonlinearity (whose output activation matching observes)."""
    if module is not None:
        return isinstance(module, (*_ACTS, Sine))
    if node.op == "call_function":
        return node.target in _ACT_FNS[:-1] or node.target in {
            getattr(torch, n) for n in ("relu", "sigmoid", "tanh", "sin")
        }
    return node.op == "call_method" and node.target in ("relu", "sigmoid", "tanh", "sin")


def _assemble(
    state: dict[str, Tensor], axes: _Axes, shapes: dict[str, tuple[int, ...] | None]
) -> tuple[PermutationSpec, dict[str, list[Elem]]]:
    """Turn the classes into groups (named after the first output axis they act on) and a spec."""
    fixed = {axes.find(e)[0] for e in axes.fixed}
    classes: dict[Elem, list[tuple[Elem, Fraction]]] = {}
    for e in list(axes.parent):
        root, w = axes.find(e)
        classes.setdefault(root, []).append((e, w))
    order = {k: i for i, k in enumerate(state)}
    found = []
    for root, members in classes.items():
        params = [(e, w) for e, w in members if e[0] == "p"]
        if root in fixed or not params or len(params) == len(members):
            continue  # touches the graph's inputs/outputs, holds no weights, or no activations
        base = min(w for _, w in members)  # the finest axis of the class sets the group size
        sizes = {
            Fraction(state[k].shape[d] if kind == "p" else shapes[k][d]) * base / w
            for (kind, k, d), w in members
        }
        n = next(iter(sizes))
        if (
            len(sizes) != 1
            or n.denominator != 1
            or any((w / base).denominator != 1 for _, w in params)
        ):
            continue  # inconsistent block structure: leave these axes alone rather than guess
        params.sort(key=lambda m: (order[m[0][1]], m[0][2]))
        whole = [e for e, w in members if w == base]  # axes of one neuron per entry
        found.append((int(n), [(k, d, int(w / base)) for (_, k, d), w in params], whole))
    groups: dict[str, int] = {}
    entries: dict[tuple[str, int], AxisPerm] = {}
    elems: dict[str, list[Elem]] = {}
    for n, members, everything in sorted(found, key=lambda f: (order[f[1][0][0]], f[1][0][1])):
        name = _group_name(members, groups)
        groups[name] = n
        elems[name] = everything
        for k, d, inner in members:
            entries[(k, d)] = AxisPerm(name, inner)
    spec_axes = {k: tuple(entries.get((k, d)) for d in range(v.dim())) for k, v in state.items()}
    return PermutationSpec(groups, spec_axes), elems


def _group_name(members: list[tuple[str, int, int]], taken: dict[str, int]) -> str:
    """``<module>.out`` for the first tensor whose axis 0 the group acts on (else ``<key>:<axis>``)."""
    first = next(((k, a) for k, a, _ in members if a == 0), (members[0][0], members[0][1]))
    base = (
        f"{first[0].rpartition('.')[0] or first[0]}.out"
        if first[1] == 0
        else f"{first[0]}:{first[1]}"
    )
    name, i = base, 2
    while name in taken:
        name, i = f"{base}#{i}", i + 1
    return name
