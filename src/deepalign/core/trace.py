"""Derive a permutation spec from any traceable module with torch.fx.

The graph is traced once and run on the example input to learn every node's shape. Each node's
rule (:mod:`deepalign.core.trace_ops`, :mod:`deepalign.core.trace_attention`) relates the axes of
its inputs, output and weights; :mod:`deepalign.core.axis_classes` turns the relations into
permutation groups. The graph's inputs and outputs are fixed. An op without a rule is an error
naming the op and the fx node, never a guess; an op computed from the graph's inputs and constants
alone (patches cut from the image, positions from ``torch.arange``) needs no rule: no neuron axis
can reach it.

Adding an op is a few local lines::

    @handles(nn.Softplus, "softplus")
    def _(op):
        op.pointwise()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from deepalign.core import trace_attention  # noqa: F401  (registers the attention rules)
from deepalign.core.axis_classes import AxisClasses, Elem, build_spec
from deepalign.core.layers import Sine
from deepalign.core.spec import PermutationSpec
from deepalign.core.trace_ops import (
    _ACT_FNS,
    _ACTS,
    _MODULES,
    Op,
    _describe_target,
    _handler,
    _shape,
    _shapes,
    _tensor_args,
    _unknown,
    handles,
)
from deepalign.errors import DeepAlignError

__all__ = ["Op", "Traced", "handles", "spec_from_model", "trace_model"]


class _Tracer(fx.Tracer):
    """Keeps every module with a handler as one leaf node (torch's own modules are leaves anyway);
    buffers are graph nodes, so slicing one by a traced size (a causal mask) traces."""

    proxy_buffer_attributes = True

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
        if isinstance(result, (tuple, list)) and any(isinstance(r, Tensor) for r in result):
            n.meta["shapes"] = [tuple(r.shape) if isinstance(r, Tensor) else None for r in result]
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
    carries the group's neurons on axis ``dim`` (activation matching correlates these), else the
    first output of any op that does (attention's queries, say). ``inner[group] = (module, kind)``
    for groups that live inside a leaf module (torch's attention and transformer layers): ``"q"``
    and ``"v"``, the query and value projections of the ``nn.MultiheadAttention`` at ``module``;
    ``"hidden"``, the activated MLP units of the transformer layer at ``module``. Groups seen
    nowhere are absent.
    """

    spec: PermutationSpec
    graph: fx.GraphModule
    probes: dict[str, tuple[str, int]]
    inner: dict[str, tuple[str, str]] = field(default_factory=dict)
    streams: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def activations(
        self,
        model: nn.Module,
        state: Mapping[str, Tensor],
        x: Tensor | tuple[Tensor, ...],
        streams: bool = False,
    ) -> dict[str, Tensor]:
        """Per probed group, ``(samples, n)`` activations of ``model`` with weights ``state`` on
        ``x``: the group's axis last, every other axis (batch, positions) a sample."""
        gm = fx.GraphModule(model, self.graph.graph)
        used = gm.state_dict().keys()  # the graph keeps only the tensors the forward reads
        gm.load_state_dict({k: v for k, v in state.items() if k in used})
        want: dict[str, list[tuple[str, int]]] = {}
        for g, (node, d) in self.probes.items():
            for n, dim in self.streams.get(g, [(node, d)]) if streams else [(node, d)]:
                want.setdefault(n, []).append((g, dim))
        parts: dict[str, list[Tensor]] = {}

        class _Grab(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                for g, d in want.get(n.name, ()):
                    parts.setdefault(g, []).append(
                        out.detach().movedim(d, -1).reshape(-1, out.shape[d])
                    )
                return out

        seen: dict[str, Tensor] = {}
        hooks = [_observe(gm, path, kind, g, seen) for g, (path, kind) in self.inner.items()]
        inputs = x if isinstance(x, tuple) else (x,)
        flags = [(p, p.requires_grad) for p in gm.parameters()]
        try:
            # with gradients on, torch's transformer layers take their plain path (the fused
            # inference kernels skip the submodule calls the hooks observe)
            with torch.enable_grad():
                for p, _ in flags:
                    p.requires_grad_(True)
                _Grab(gm.eval()).run(*inputs)
        finally:
            for h in hooks:
                h.remove()
            for p, flag in flags:  # the caller's modules are shared with the graph
                p.requires_grad_(flag)
        # a stream: the samples of every activation, each standardised per unit, so that no
        # layer's scale or offset dominates (their correlations are averaged, in effect)
        seen.update({g: torch.cat([_standard(t) for t in ts]) for g, ts in parts.items()})
        return seen


def _observe(gm: nn.Module, path: str, kind: str, group: str, seen: dict[str, Tensor]) -> Any:
    """A hook recording ``group``'s activations inside the leaf module at ``path``."""
    if kind == "hidden":
        layer = gm.get_submodule(path)

        def after(_m: nn.Module, _args: Any, out: Tensor) -> None:
            act = layer.activation(out)
            seen[group] = act.detach().reshape(-1, act.shape[-1])

        return layer.linear1.register_forward_hook(after)
    mha = gm.get_submodule(path)

    def before(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value")
        x = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
        e = m.embed_dim
        rows = slice(0, e) if kind == "q" else slice(2 * e, 3 * e)
        if m._qkv_same_embed_dim:
            w = m.in_proj_weight[rows]
        else:
            w = m.q_proj_weight if kind == "q" else m.v_proj_weight
        b = None if m.in_proj_bias is None else m.in_proj_bias[rows]
        out = F.linear(x["query" if kind == "q" else "value"], w, b)
        seen[group] = out.detach().reshape(-1, e)

    return mha.register_forward_pre_hook(before, with_kwargs=True)


def trace_model(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> Traced:
    """:func:`spec_from_model` and the activation probes of every group (see :class:`Traced`)."""
    state = model.state_dict()
    keys = set(state)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    gm = _trace(model, inputs)
    classes = AxisClasses()
    tied: dict[tuple, str] = {}
    for key, t in state.items():  # one storage under two names: same permutation on both
        first = tied.setdefault((t.data_ptr(), t.shape, t.stride()), key) if t.numel() else key
        if first != key:
            for d in range(t.dim()):
                classes.union(("p", first, d), ("p", key, d), 1)
    virtual: dict[Elem, int] = {}
    observers: dict[Elem, tuple[str, str]] = {}

    def tensor_axes(n: fx.Node) -> list[Elem]:
        shape = _shape(n)
        return [("t", n.name, d) for d in range(len(shape or ()))]

    nonlinear: list[str] = []
    raw: set[str] = set()  # nodes computed from the graph's inputs and constants alone
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            raw.add(node.name)
            nodes = [node] if node.op == "placeholder" else _tensor_args(node)
            classes.fixed.update(e for n in nodes for e in tensor_axes(n))
            if node.op == "output":  # items of a returned tuple output too
                fx.node.map_arg(node.args, lambda n: classes.fixed.update(_item_axes(n)))
            continue
        if node.op == "get_attr":
            in_state = node.target in keys  # a constant that is not in the state dict stays fixed
            for e in tensor_axes(node):
                if in_state:
                    classes.union(e, ("p", node.target, e[2]), 1)
                else:
                    classes.fixed.add(e)
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        op = Op(node, module, keys)
        outputs = op.outputs()
        touched = [e for n in op.ins for e in tensor_axes(n)] + outputs
        if not touched:
            continue  # pure Python on sizes: cannot move any neuron
        sources = [a for a in node.args if isinstance(a, fx.Node)] if _reads_items(node) else op.ins
        weightless = module is None or not list(module.state_dict())
        if all(n.name in raw for n in sources) and weightless:
            # made from the raw inputs or from no tensor at all (patches cut from the image,
            # positions from torch.arange): no neuron axis can reach it, so it needs no rule
            raw.add(node.name)
            classes.fixed.update(outputs)
            continue
        handler = _handler(node, module)
        if handler is None:
            raise _unknown(node, _describe_target(node, module))
        handler(op)
        if _is_nonlinear(node, module):
            nonlinear.append(node.name)
        linked = set(op.free)
        for a, b, factor in op.links:
            classes.union(a, b, factor)
            linked |= {a, b}
        for j in op.joins:
            classes.joins.append(j)
            linked |= {j.whole, *j.parts}
        for s in op.splits:
            classes.splits.append(s)
            linked |= {s.whole, s.head, s.within}
        for c in op.choices:
            classes.choices.append(c)
            linked |= {c.pivot, c.join.whole, c.splits[0].head, c.splits[0].within}
        virtual.update(op.sizes)
        observers.update(op.observers)
        classes.fixed.update(e for e in touched if e not in linked)
    shapes = {n.name: _shape(n) for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        for i, sh in enumerate(_shapes(n) or []):
            shapes[f"{n.name}#{i}"] = sh

    def size(e: Elem) -> int:
        kind, name, d = e
        if kind == "p":
            return state[name].shape[d]
        return virtual[e] if kind in ("v", "a") else shapes[name][d]

    classes.resolve(size)
    spec, members = build_spec(state, classes, size)
    probes, inner, streams = {}, {}, {}
    for group, elems in members.items():
        seen_at = [observers[e] for e in elems if e in observers]
        if seen_at:
            inner[group] = seen_at[0]
    calls = [n.name for n in gm.graph.nodes if n.op.startswith("call")]
    views = {n.name for n in gm.graph.nodes if _is_view(n)}  # the same values again
    looked = nonlinear + [n for n in calls if n not in set(nonlinear)]  # else any activation
    for group, elems in members.items():
        if group in spec.ties():
            continue  # a head order is read off its groups' activations, never on its own
        for name in looked:
            dims = [d for kind, node, d in elems if kind == "t" and node == name]
            if dims:
                probes[group] = (name, dims[0])
                break
        if group in probes and probes[group][0] not in nonlinear:
            # no nonlinearity sees it (a residual stream): every activation that carries it
            at = {node: d for kind, node, d in elems if kind == "t"}
            every = [(n, at[n]) for n in calls if n in at and n not in views]
            if len(every) > 1:
                streams[group] = every
    for group in list(inner):  # a nonlinearity's output beats a projection inside a leaf
        if group in probes and probes[group][0] in nonlinear:
            del inner[group]
        else:
            probes.pop(group, None)
            streams.pop(group, None)
    return Traced(spec, gm, probes, inner, streams)


def _standard(t: Tensor) -> Tensor:
    return (t - t.mean(0)) / (t.std(0) + 1e-6) if t.shape[0] > 1 else t


_VIEWS = ("flatten", "view", "reshape", "transpose", "permute", "contiguous", "expand", "squeeze")


def _is_view(n: fx.Node) -> bool:
    """A node whose output holds its input's values again (a reshape, an index, a copy)."""
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return n.op in ("call_method", "call_function") and (name in _VIEWS or name == "getitem")


def _item_axes(n: Any) -> list[Elem]:
    """Every axis of every tensor item of a node's tuple output."""
    return [
        (("t", f"{n.name}#{i}", d))
        for i, sh in enumerate(_shapes(n) or [])
        if sh
        for d in range(len(sh))
    ]


def _reads_items(node: fx.Node) -> bool:
    """True for ``getitem`` of a tuple output (it has no tensor argument, yet reads one)."""
    return any(_shapes(a) is not None for a in node.args if isinstance(a, fx.Node))


def _is_nonlinear(node: fx.Node, module: nn.Module | None) -> bool:
    """A pointwise nonlinearity (whose output activation matching observes)."""
    if module is not None:
        return isinstance(module, (*_ACTS, Sine))
    if node.op == "call_function":
        return node.target in _ACT_FNS[:-1] or node.target in {
            getattr(torch, n) for n in ("relu", "sigmoid", "tanh", "sin")
        }
    return node.op == "call_method" and node.target in ("relu", "sigmoid", "tanh", "sin")
