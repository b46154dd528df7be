"""Permutation rules of torch ops: which axes of an op's inputs, output and weights move together.

One handler per op (registered by module class, function, or method name) *links* the axes the op
is permutation-equivariant on (see :mod:`deepalign.core.axis_classes` for the relations). Safe by
default: every axis of an op's inputs and output that its handler neither links nor declares
invariant (``free``, e.g. a reduced axis) is *fixed*. An op without a handler is an error, never a
guess. Adding an op is a few local lines::

    @handles(nn.Softplus, "softplus")
    def _(op):
        op.pointwise()
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from deepalign.core.axis_classes import Choice, Elem, HeadSplit, Join
from deepalign.core.layers import Sine
from deepalign.errors import DeepAlignError

# ("t", node name, dim) for an activation axis (``node#i`` for item i of a tuple output),
# ("p", state key, dim) for a parameter/buffer axis, ("v", name, dim) for one inside a leaf module
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


def _shapes(node: Any) -> list[tuple[int, ...] | None] | None:
    """The shapes of a node's tuple (or list) output, item by item (None when not a sequence)."""
    return node.meta.get("shapes") if isinstance(node, fx.Node) else None


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
        self.joins: list[Join] = []
        self.splits: list[HeadSplit] = []
        self.sizes: dict[Elem, int] = {}  # of virtual axes
        self.observers: dict[Elem, tuple[str, str]] = {}  # virtual axis -> (module path, kind)
        self.choices: list[Choice] = []

    # -- addressing -----------------------------------------------------------------------------
    def x(self, i: int, dim: int) -> Elem:
        """Axis ``dim`` of tensor input ``i``."""
        return ("t", self.ins[i].name, dim % len(_shape(self.ins[i])))

    def y(self, dim: int) -> Elem:
        """Axis ``dim`` of the output."""
        return ("t", self.node.name, dim % len(self.out_shape))

    def out(self, i: int, dim: int) -> Elem:
        """Axis ``dim`` of item ``i`` of a tuple output."""
        return ("t", f"{self.node.name}#{i}", dim % len(_shapes(self.node)[i]))

    def outputs(self) -> list[Elem]:
        """Every axis of the output (of every item of a tuple output)."""
        if self.out_shape is not None:
            return [self.y(d) for d in range(len(self.out_shape))]
        items = _shapes(self.node) or []
        return [self.out(i, d) for i, sh in enumerate(items) if sh for d in range(len(sh))]

    def virtual(self, name: str, size: int) -> Elem:
        """An axis of ``size`` units inside a leaf module (a projection's output, say)."""
        e = ("v", name, 0)
        self.sizes[e] = size
        return e

    def param(self, name: str, dim: int) -> Elem | None:
        """Axis ``dim`` of the module's state entry ``name`` (None when the module has none)."""
        return self.state(f"{self.node.target}.{name}", dim)

    def state(self, key: str, dim: int) -> Elem | None:
        """Axis ``dim`` of the state entry ``key`` (None when the model has none)."""
        return ("p", key, dim) if key in self.state_keys else None

    def inp(self, node: Any, dim: int) -> Elem | None:
        """Axis ``dim`` of the tensor argument ``node`` (None when it is not a tensor)."""
        return self.x(self.ins.index(node), dim) if node in self.ins else None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        a = self.node.args
        return a[index] if len(a) > index else self.node.kwargs.get(name, default)

    # -- building blocks ------------------------------------------------------------------------
    def link(self, a: Elem | None, b: Elem | None, factor: int = 1) -> None:
        """``b`` is ``a`` with each neuron a block of ``factor`` entries."""
        if a is not None and b is not None:
            self.links.append((a, b, factor))

    def observe(self, e: Elem, path: str, kind: str) -> None:
        """Activations of the virtual axis ``e`` can be read at the module ``path`` (see
        :class:`deepalign.core.trace.Traced`)."""
        self.observers[e] = (path, kind)

    def join(self, whole: Elem | None, parts: list[Elem]) -> None:
        """``whole`` is the concatenation of ``parts`` along one axis."""
        if whole is not None:
            self.joins.append(Join(whole, tuple(parts)))

    def split_heads(self, whole: Elem | None, head: Elem, within: Elem) -> None:
        """``whole`` is viewed row-major as ``(head, within)``: attention heads."""
        if whole is not None:
            self.splits.append(HeadSplit(whole, head, within))

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
            if sorted((len(ins), len(outs))) == [1, 2] and min(a + b) > 1:  # (H*d) <-> (H, d)
                if len(big_a) == 1:
                    whole, (h, d) = self.x(0, big_a[0]), (self.y(big_b[0]), self.y(big_b[1]))
                else:
                    whole, (h, d) = self.y(big_b[0]), (self.x(0, big_a[0]), self.x(0, big_a[1]))
                self.split_heads(whole, h, d)
                continue
            block_a, block_b = prod(a[1:]), prod(b[1:])
            if len(ins) == 1 and len(outs) == 3 and min(b) > 1:  # (k*H*d) -> (k, H, d)
                self._fused_heads(self.x(0, ins[0]), [self.y(d) for d in outs], b, block_b)
                continue
            if block_a % block_b == 0:
                self.link(self.x(0, ins[0]), self.y(outs[0]), block_a // block_b)
            elif block_b % block_a == 0:
                self.link(self.y(outs[0]), self.x(0, ins[0]), block_b // block_a)

    def _fused_heads(self, whole: Elem, outs: list[Elem], sizes: list[int], block: int) -> None:
        """``(k * H * d) -> (k, H, d)``: a fused projection (``qkv.reshape(B, N, 3, H, d)``) when
        the ``k`` axis is then taken apart (unbind, indexing), else channels of ``H * d`` entries
        (a flattened feature map unflattened); :class:`AxisClasses` decides once all is linked."""
        k, h, d = outs
        parts = [("a", f"{self.node.name}.part{i}", 0) for i in range(sizes[0])]
        for e in parts:
            self.sizes[e] = sizes[1] * sizes[2]
        self.choices.append(
            Choice(
                k,
                (k, whole, block),
                Join(whole, tuple(parts)),
                tuple(HeadSplit(e, h, d) for e in parts),
            )
        )


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
_MATH_NAMES = ("sqrt", "rsqrt", "pow", "erf", "masked_fill", "where")


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
    *(getattr(torch, n) for n in _MATH_NAMES),
    *_MATH_NAMES,
    operator.pow,
    nn.Mish,
    F.mish,
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
    "half",
    "bfloat16",
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
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


@handles(nn.GroupNorm, F.group_norm)
def _groupnorm(op: Op) -> None:
    """Statistics per group of consecutive channels: channels move within their group, and whole
    groups move together (the structure of attention heads: ``groups x channels per group``)."""
    op.pointwise()
    if op.module is not None:
        groups = op.module.num_groups
        op.link(op.y(1), op.param("weight", 0))
        op.link(op.y(1), op.param("bias", 0))
    else:  # F.group_norm(x, num_groups, weight, bias)
        groups = op.arg(1, "num_groups")
        for i in range(1, len(op.ins)):
            op.link(op.y(1), op.x(i, 0))
    channels = op.out_shape[1]
    if 1 < groups < channels:  # one group, or one channel per group: any permutation
        name = f"{op.node.name}.groups"
        op.split_heads(
            op.y(1), op.virtual(name, groups), op.virtual(f"{name}.within", channels // groups)
        )


@handles(torch.einsum)
def _einsum(op: Op) -> None:
    """``einsum("bhid,bhjd->bhij", q, k)``: one letter is one axis on every operand and the output;
    a summed letter is contracted (its operands' axes move together)."""
    equation, *operands = op.node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = equation.replace(" ", "")
    if "..." in equation:
        raise _unknown(op.node, "torch.einsum with '...'")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if not arrow:
        out = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    where: dict[str, list] = {}
    for term, node in zip(terms, operands, strict=True):
        if len(set(term)) != len(term):
            continue  # a diagonal: its axes stay fixed
        for pos, letter in enumerate(term):
            where.setdefault(letter, []).append(op.inp(node, pos))
    for letter, axes in where.items():
        if letter in out:
            for a in axes:
                op.link(a, op.y(out.index(letter)))
        elif len(axes) == 1:
            op.free.add(axes[0])  # summed over one operand alone: invariant
        else:
            for a in axes[1:]:
                op.link(axes[0], a)


@handles(nn.LayerNorm, nn.RMSNorm)
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


@handles(F.layer_norm, F.rms_norm)
def _layernorm_fn(op: Op) -> None:
    op.link(op.x(0, -1), op.y(-1))
    op.leading(1)
    k = len(op.arg(1, "normalized_shape"))
    for i in range(1, len(op.ins)):  # weight and bias, given as tensors
        for d in range(k):
            op.link(op.y(d - k), op.x(i, d))


@handles(
    torch.mean, torch.sum, torch.amax, torch.var, torch.std, "mean", "sum", "amax", "var", "std"
)
def _reduce(op: Op) -> None:
    shape = _shape(op.ins[0])
    dims = op.arg(1, "dim")
    dims = range(len(shape)) if dims is None else [dims] if isinstance(dims, int) else dims
    dims = {d % len(shape) for d in dims}
    name = getattr(op.node.target, "__name__", op.node.target)
    keep = op.arg(3 if name in ("var", "std") else 2, "keepdim", False)
    kept = [d for d in range(len(shape)) if keep or d not in dims]
    for od, d in enumerate(kept):
        if d not in dims:
            op.link(op.x(0, d), op.y(od))
    op.free |= {op.x(0, d) for d in dims}  # a sum over a permuted axis is invariant


@handles(torch.cat, torch.concat, torch.concatenate)
def _cat(op: Op) -> None:
    dim = op.arg(1, "dim", 0) % len(op.out_shape)
    items = list(op.arg(0, "tensors"))
    for t in dict.fromkeys(items):
        i = op.ins.index(t)
        for d in range(len(op.out_shape)):
            if d != dim:
                op.link(op.x(i, d), op.y(d))
    op.join(op.y(dim), [op.x(op.ins.index(t), dim) for t in items])


@handles(torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split")
def _split(op: Op) -> None:
    n = len(_shape(op.ins[0]))
    dim = op.arg(2, "dim", 0) % n
    items = _shapes(op.node) or []
    for i in range(len(items)):
        for d in range(n):
            if d != dim:
                op.link(op.x(0, d), op.out(i, d))
    op.join(op.x(0, dim), [op.out(i, dim) for i in range(len(items))])


@handles(torch.unbind, "unbind")
def _unbind(op: Op) -> None:
    n = len(_shape(op.ins[0]))
    dim = op.arg(1, "dim", 0) % n
    for i in range(len(_shapes(op.node) or [])):
        for od, d in enumerate(e for e in range(n) if e != dim):
            op.link(op.x(0, d), op.out(i, od))


@handles(operator.getitem)
def _getitem(op: Op) -> None:
    src, index = op.node.args
    items = _shapes(src)
    if items is not None:  # an item of a tuple output (chunk, split, attention modules)
        if isinstance(index, int):
            for d in range(len(op.out_shape)):
                op.link(("t", f"{src.name}#{index % len(items)}", d), op.y(d))
        return
    shape = _shape(src)
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) and _shape(i) is not None for i in index):
        return  # advanced indexing by a tensor: every axis it touches stays fixed
    n_ell = len(shape) - sum(1 for i in index if i is not None and i is not Ellipsis)
    d = od = 0
    for i in index:
        if i is Ellipsis:
            for _ in range(n_ell):
                op.link(op.x(0, d), op.y(od))
                d, od = d + 1, od + 1
        elif i is None:
            od += 1
        elif isinstance(i, slice):
            if shape[d] == op.out_shape[od] and i.step in (None, 1):
                op.link(op.x(0, d), op.y(od))  # a slice that keeps every entry
            d, od = d + 1, od + 1
        else:  # an integer picks one entry: the axis goes (and stays fixed)
            d += 1
    while d < len(shape):
        op.link(op.x(0, d), op.y(od))
        d, od = d + 1, od + 1


@handles("expand", "expand_as", "broadcast_to", torch.broadcast_to, "type_as", "to")
def _expand(op: Op) -> None:
    shape, n = _shape(op.ins[0]), len(op.out_shape)
    for d, size in enumerate(shape):
        if size == op.out_shape[d + n - len(shape)]:
            op.link(op.x(0, d), op.y(d + n - len(shape)))
    for i in range(1, len(op.ins)):  # expand_as(other): only other's shape is read
        op.free |= {op.x(i, d) for d in range(len(_shape(op.ins[i])))}


@handles(torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm")
def _matmul(op: Op) -> None:
    a, b = op.ins[0], op.ins[-1]
    sa, sb, n = _shape(a), _shape(b), len(op.out_shape)
    if len(sa) < 2 or len(sb) < 2:
        return  # matrix-vector products: leave their axes fixed
    for i, sh in ((0, sa), (len(op.ins) - 1, sb)):  # broadcast batch axes
        for d in range(len(sh) - 2):
            od = d + n - len(sh)
            if sh[d] == op.out_shape[od]:
                op.link(op.x(i, d), op.y(od))
    j = len(op.ins) - 1
    op.link(op.x(0, -1), op.x(j, -2))  # the contracted axis: permuted alike on both sides
    op.link(op.x(0, -2), op.y(-2))
    op.link(op.x(j, -1), op.y(-1))


@handles(nn.Embedding, F.embedding)
def _embedding(op: Op) -> None:
    op.leading(1)
    if op.module is not None:
        op.link(op.y(-1), op.param("weight", 1))
    else:
        op.link(op.y(-1), op.x(1, 1))  # F.embedding(indices, weight); rows picked by index stay


@handles("size", "dim")
def _size(op: Op) -> None:
    op.free |= {op.x(0, d) for d in range(len(_shape(op.ins[0])))}


@handles(getattr)
def _getattr(op: Op) -> None:
    if op.node.args[1] not in ("shape", "dtype", "device", "ndim"):
        raise _unknown(op.node, f"attribute .{op.node.args[1]}")
    _size(op)


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
