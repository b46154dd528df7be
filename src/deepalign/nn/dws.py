"""Equivariant deep-weight-space (DWS) layers over the weight-space view.

A network with ``L`` layers has ``2L`` tensors ("slots"): weights ``W_l`` with axes ``(l, l+1)`` and
biases ``b_l`` with axis ``(l+1,)``, where axis labels are layer boundaries ``0..L`` and every tensor
ends with a channel axis. Hidden boundaries ``1..L-1`` are permuted by the symmetry group; the input
and output boundaries ``0`` and ``L`` are not.

**One mechanism builds every block.** The equivariant linear maps from slot ``X`` to slot ``Y`` are,
for each subset ``S`` of the axes they share: pool ``X`` over its other axes, map the channels, and
broadcast over the axes of ``Y`` outside ``S`` (DWSNets' weight->weight, bias->bias, weight->bias and
bias->weight families are all of this form). Grouped by ``S``, a layer holds:

* ``|S| = 1`` (one boundary ``a``): ONE set layer (SAB or DeepSets) across the neurons of ``a``,
  reading every slot that holds them (reduced to ``a``, channels concatenated) and writing the
  features of every output slot that holds them (split, then broadcast);
* ``|S| = 2``: a pointwise Linear from a weight slot to itself (the only slot with both axes);
* ``S = {}``: a Linear from the fully pooled sources to each output slot; ``diagonal=True`` keeps
  only sources sharing an axis with it — exactly the neighbouring-layer blocks of DWSNets — and
  ``diagonal=False`` adds every other slot.

**Cost.** Weight slots hold ``n_l * n_{l+1}`` entries, bias slots ``n_{l+1}``: the per-entry work on
weight slots dominates everything. Weight slots therefore carry ``edge_channels`` features (DWSNets
uses the full width), and neuron (bias) features additionally receive *weight-weighted messages*
``sum_i w_ij A h_i`` (and the transposed, outgoing direction): the input weights used as operators
on the neighbouring neurons' features, as the network itself propagates signals. This bilinear term
is equivariant, costs ``n_l * n_{l+1} * channels`` (no per-edge matrix product), and lets a neuron
see its whole weight vector in the context of its neighbours' identities.

The unpermuted input/output boundaries are handled by the same code (as sets); the encoder breaks
their symmetry with learned per-position embeddings, so pixels and classes act as features while
the parameter count stays independent of their number (see :class:`DWSEncoder`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepalign.core.arch import activation
from deepalign.errors import DeepAlignError
from deepalign.nn.set_layers import pool, set_layer

Axes = tuple[int, ...]


def slot_axes(n_layers: int) -> list[Axes]:
    """Axis labels (layer boundaries) of the ``2L`` slots: ``W_0..W_{L-1}``, then ``b_0..b_{L-1}``."""
    return [(m, m + 1) for m in range(n_layers)] + [(m + 1,) for m in range(n_layers)]


def slot_name(i: int, n_layers: int) -> str:
    return f"W{i}" if i < n_layers else f"b{i - n_layers}"


def hidden_bias_slots(n_layers: int) -> list[int]:
    """Slot indices of the biases of hidden layers (one per permuted boundary)."""
    return [n_layers + m for m in range(n_layers - 1)]


def _heads(width: int, n_heads: int) -> int:
    """``n_heads`` where each head keeps >= 8 channels, else fewer (always dividing ``width``)."""
    h = max(1, min(n_heads, width // 8))
    while width % h:
        h -= 1
    return h


class DWSLayer(nn.Module):
    """One equivariant layer on ``2L`` slots; weight/bias slots have their own channel widths.

    ``c_in``/``c_out`` are ``(weight_channels, bias_channels)``. ``op_features=F > 0`` adds the
    weight-weighted neighbour messages to bias outputs; they need the input weights as ``ops``
    (``(B, n_l, n_{l+1}, F)`` each) in :meth:`forward`. ``outputs`` restricts the computed slots
    (e.g. only hidden biases in an encoder's last layer).
    """

    def __init__(
        self,
        n_layers: int,
        c_in: tuple[int, int],
        c_out: tuple[int, int],
        *,
        set_layer_kind: str = "sab",
        pooling: str = "max",
        diagonal: bool = True,
        n_heads: int = 8,
        act: str = "relu",
        op_features: int = 0,
        outputs: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        L = n_layers
        self.n_layers, self.pooling, self.op_features = L, pooling, op_features
        self.axes = slot_axes(L)
        self.outputs = list(range(2 * L) if outputs is None else outputs)
        w_in = [c_in[0]] * L + [c_in[1]] * L
        w_out = [c_out[0]] * L + [c_out[1]] * L
        # terms: (kept axes, source slots, [(output slot, width)], module name)
        self.plan: list[tuple[Axes, list[int], list[tuple[int, int]], str]] = []
        self.maps = nn.ModuleDict()

        def add(keep: Axes, outs: list[int], srcs: list[int], name: str) -> None:
            width, out = sum(w_in[x] for x in srcs), sum(w_out[y] for y in outs)
            self.maps[name] = (
                set_layer(set_layer_kind, width, out, _heads(out, n_heads), activation(act))
                if len(keep) == 1
                else nn.Linear(width, out)
            )
            self.plan.append((keep, srcs, [(y, w_out[y]) for y in outs], name))

        for a in range(L + 1):
            # one set layer per boundary: every slot holding its neurons, reduced to them, in;
            # the features of every output slot holding them out (the sources are the same)
            outs = [y for y in self.outputs if a in self.axes[y]]
            if outs:
                add((a,), outs, [x for x, ax in enumerate(self.axes) if a in ax], f"set{a}")
        for y in self.outputs:
            ay = self.axes[y]
            pooled = [x for x, ax in enumerate(self.axes) if not diagonal or set(ax) & set(ay)]
            add((), [y], pooled, f"{slot_name(y, L)}_pool")
            if len(ay) == 2:
                add(ay, [y], [y], f"{slot_name(y, L)}_self")
        # weight-weighted messages into bias slot y (boundary m = y - L + 1) from both neighbours
        self.msg = nn.ModuleDict()
        if op_features:
            for y in self.outputs:
                if y < L:
                    continue
                m = y - L + 1
                for side, nb in (("f", m - 1), ("b", m + 1)):
                    if nb <= L:
                        width = w_in[0] if nb == 0 else w_in[L + nb - 1]
                        self.msg[f"{side}{m}"] = nn.Linear(width, op_features * w_out[y])

    def node_features(self, xs: Sequence[Tensor], reduced, boundary: int) -> Tensor:
        """Per-neuron features of a boundary: its bias slot, or (inputs) ``W_0`` pooled over neurons."""
        return reduced(0, (0,)) if boundary == 0 else xs[self.n_layers + boundary - 1]

    def forward(self, xs: Sequence[Tensor], ops: Sequence[Tensor] | None = None) -> list[Tensor]:
        L = self.n_layers
        if len(xs) != 2 * L:
            raise DeepAlignError(f"DWS layer expects {2 * L} tensors, got {len(xs)}")
        if self.op_features and (ops is None or len(ops) != L):
            raise DeepAlignError(f"DWS layer with messages needs the {L} input weight tensors")
        cache: dict[tuple[int, Axes], Tensor] = {}

        def reduced(x: int, keep: Axes) -> Tensor:
            """Slot ``x`` pooled over every axis outside ``keep`` (cached, one axis at a time)."""
            if (x, keep) not in cache:
                ax = self.axes[x]
                drop = [a for a in ax if a not in keep]
                if not drop:
                    cache[(x, keep)] = xs[x]
                else:
                    parent_keep = tuple(a for a in ax if a in keep or a == drop[-1])
                    parent = reduced(x, parent_keep)
                    dim = 1 + parent_keep.index(drop[-1])
                    cache[(x, keep)] = pool(parent, [dim], self.pooling)
            return cache[(x, keep)]

        parts: dict[int, list[Tensor]] = {y: [] for y in self.outputs}
        shared: set[int] = set()
        for keep, srcs, outs, name in self.plan:
            inp = [reduced(x, keep) for x in srcs]
            out = self.maps[name](inp[0] if len(inp) == 1 else torch.cat(inp, dim=-1))
            pieces = out.split([w for _, w in outs], dim=-1) if len(outs) > 1 else (out,)
            for (y, _), piece in zip(outs, pieces, strict=True):
                for i, a in enumerate(self.axes[y]):
                    if a not in keep:
                        piece = piece.unsqueeze(1 + i)
                if len(outs) > 1:
                    shared.add(id(piece))
                parts[y].append(piece)
        if self.op_features:
            for y in self.outputs:
                if y >= L:
                    parts[y] += self._messages(y - L + 1, xs, reduced, ops)
        return [_broadcast_sum(parts[y], shared) for y in self.outputs]

    def _messages(self, m: int, xs, reduced, ops) -> list[Tensor]:
        """``sum_if w_ijf A_f h_i`` from boundary m-1 and ``sum_kf w_jkf B_f h_k`` from m+1."""
        out = []
        for side, nb, eq in (("f", m - 1, "bijf,bifc->bjc"), ("b", m + 1, "bjif,bifc->bjc")):
            key = f"{side}{m}"
            if key not in self.msg:
                continue
            op = ops[m - 1] if side == "f" else ops[m]
            h = self.msg[key](self.node_features(xs, reduced, nb))
            h = h.reshape(*h.shape[:2], self.op_features, -1)
            out.append(torch.einsum(eq, op, h) / math.sqrt(h.shape[1]))
        return out


def _broadcast_sum(parts: list[Tensor], shared: set[int]) -> Tensor:
    """Sum broadcastable terms: small ones first, then into a full-size term, in place unless it is
    a piece of a split set-layer output (``id`` in ``shared``; autograd forbids writing to those)."""
    parts = sorted(parts, key=lambda t: (t.numel(), id(t) not in shared))
    full, small = parts.pop(), None
    owned = id(full) not in shared

    def into_full(t: Tensor) -> None:
        nonlocal full, owned
        full = full.add_(t) if owned else full + t
        owned = True

    for t in parts:
        if small is None:
            small = t
        elif torch.broadcast_shapes(small.shape, t.shape) == full.shape:
            into_full(t)
        else:
            small = small + t
    if small is not None:
        into_full(small)
    return full


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks, differentiable: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _synced_batchnorm(x: Tensor, bn: nn.BatchNorm1d) -> Tensor:
    """Training-mode BatchNorm of ``(M, C)`` rows whose statistics cover every rank's rows (the
    global batch of a data-parallel run); updates the running statistics the same way."""
    c = x.shape[1]
    local = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))])
    total = _AllReduceSum.apply(local)  # gradients flow back to every rank's rows
    count = total[-1]
    mean = total[:c] / count
    var = (total[c : 2 * c] / count - mean * mean).clamp_min(0)
    out = (x - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        out = out * bn.weight + bn.bias
    if bn.track_running_stats:
        with torch.no_grad():
            m = bn.momentum if bn.momentum is not None else 0.1
            n = float(count)
            bn.running_mean.mul_(1 - m).add_(m * mean.detach())
            bn.running_var.mul_(1 - m).add_(m * var.detach() * n / max(n - 1, 1))
            bn.num_batches_tracked.add_(1)
    return out


class SlotNorm(nn.Module):
    """BatchNorm over the channels of every slot (statistics over batch and all entries of the slot).

    ``inplace`` lets evaluation overwrite its inputs (the encoder only passes fresh tensors). In a
    data-parallel run (an initialised process group of several ranks) training statistics cover
    the global batch.
    """

    def __init__(self, widths: Sequence[int], affine: bool = True, inplace: bool = False) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm1d(c, affine=affine) for c in widths)
        self.inplace = inplace

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        out = []
        synced = self.training and _distributed()
        for n, x in zip(self.norms, xs, strict=True):
            if synced:
                out.append(_synced_batchnorm(x.reshape(-1, x.shape[-1]), n).reshape(x.shape))
                continue
            if self.training or n.running_var is None:
                out.append(n(x.reshape(-1, x.shape[-1])).reshape(x.shape))
                continue
            # eval: one fused multiply-add (BatchNorm1d on channels-last data is slow on CPU)
            scale = (n.running_var + n.eps).rsqrt()
            shift = -n.running_mean * scale
            if n.affine:
                scale, shift = scale * n.weight, shift * n.weight + n.bias
            out.append(
                x.mul_(scale).add_(shift) if self.inplace else torch.addcmul(shift, x, scale)
            )
        return out


class DWSEncoder(nn.Module):
    """A DWSNet on the weight-space view: ``DWS -> [norm -> act -> dropout -> DWS] x n_layers``.

    * ``downsample=K`` first maps ``W_0``'s input axis ``d_0 -> K`` with a learned ``(d_0, K)`` matrix:
      ``W_0^T`` applied to K learned probe inputs, i.e. the first layer's pre-activations on them.
    * The unpermuted boundaries (inputs, outputs) get learned per-position embeddings after the
      first layer: pixels/classes become distinguishable features without being flattened into
      channels (DWSNets' flattening costs ``(d_0 * hidden)^2`` parameters per block).
    * ``outputs="hidden_biases"`` computes only the per-neuron features of the hidden layers in the
      last layer (all Deep-Align needs); ``"all"`` returns every slot.
    """

    def __init__(
        self,
        widths: Sequence[int],
        in_features: int,
        *,
        hidden: int = 64,
        edge_channels: int | None = None,
        out_features: int = 128,
        n_layers: int = 4,
        set_layer_kind: str = "sab",
        pooling: str = "max",
        diagonal: bool = True,
        messages: bool = True,
        downsample: int | None = None,
        dropout: float = 0.0,
        n_heads: int = 8,
        act: str = "relu",
        batchnorm: bool = True,
        input_norm: bool = True,
        outputs: str = "hidden_biases",
    ) -> None:
        super().__init__()
        L = len(widths) - 1
        if L < 2:
            raise DeepAlignError("a DWS encoder needs a network with at least one hidden layer")
        if outputs not in ("all", "hidden_biases"):
            raise DeepAlignError(f"unknown encoder outputs {outputs!r} (all, hidden_biases)")
        self.n_net_layers, self.outputs = L, outputs
        edge = edge_channels or hidden
        d0 = widths[0]
        self.down = (
            nn.Parameter(torch.randn(d0, downsample) / math.sqrt(d0)) if downsample else None
        )
        self.pos_in = nn.Parameter(torch.randn(downsample or d0, 1, edge))
        self.pos_out_w = nn.Parameter(torch.randn(1, widths[-1], edge))
        self.pos_out_b = nn.Parameter(torch.randn(widths[-1], hidden))
        self.in_norm = SlotNorm([in_features] * 2 * L, affine=False) if input_norm else None
        kw = dict(
            set_layer_kind=set_layer_kind,
            pooling=pooling,
            diagonal=diagonal,
            n_heads=n_heads,
            act=act,
            op_features=in_features if messages else 0,
        )
        dims = [(in_features, in_features), *[(edge, hidden)] * n_layers, (edge, out_features)]
        last_out = hidden_bias_slots(L) if outputs == "hidden_biases" else None
        self.layers = nn.ModuleList(
            DWSLayer(L, dims[i], dims[i + 1], outputs=last_out if i == n_layers else None, **kw)
            for i in range(n_layers + 1)
        )
        self.norms = nn.ModuleList(
            SlotNorm([edge] * L + [hidden] * L, inplace=True) if batchnorm else nn.Identity()
            for _ in range(n_layers)
        )
        self.act = activation(act)
        # every tensor reaching the activation is fresh (a norm or layer output): ReLU in place
        self.inplace_act = isinstance(self.act, nn.ReLU)
        self.dropout = nn.Dropout(dropout)

    def forward(self, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> list[Tensor]:
        """Padded view in (``(B, d_in, d_out, F)`` / ``(B, d_out, F)``), slot features out."""
        L = self.n_net_layers
        if len(weights) != L or len(biases) != L:
            raise DeepAlignError(f"encoder expects {L} weights and biases, got {len(weights)}")
        xs = [*weights, *biases]
        if self.down is not None:
            xs[0] = torch.einsum("bidf,ik->bkdf", xs[0], self.down)
        if self.in_norm is not None:
            xs = self.in_norm(xs)
        ops = xs[:L]
        xs = self.layers[0](xs, ops)
        xs[0] = xs[0] + self.pos_in
        xs[L - 1] = xs[L - 1] + self.pos_out_w
        xs[2 * L - 1] = xs[2 * L - 1] + self.pos_out_b
        for norm, layer in zip(self.norms, self.layers[1:], strict=True):
            xs = norm(xs)
            xs = [torch.relu_(x) if self.inplace_act else self.act(x) for x in xs]
            if self.dropout.p > 0:
                xs = [self.dropout(x) for x in xs]
            xs = layer(xs, ops)
        return xs
