"""Activation matching (Git Re-Basin): pair neurons whose activations correlate most over data.

Both networks run over the data set in batches; forward hooks on each group's probe module
(:func:`deepalign.core.spec_builders.activation_probes`; channels on axis 1, spatial positions of
conv maps count as samples) feed running sums, sums of squares and cross products, so memory does
not grow with the data set. One linear assignment per group on the Pearson correlation matrix.

Units that never vary on the data (dead ReLUs) correlate with nothing, so their assignment would be
arbitrary; in groups that have them, the weight-matching score (other groups at their activation
matching answer), scaled to 1e-6, breaks those ties. A group without a probe (no activation after
it) is solved by weight matching with the others fixed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.core.spec_builders import activation_probes
from deepalign.core.trace import Traced, trace_model
from deepalign.data.batches import labelled_batches, n_examples
from deepalign.errors import DeepAlignError
from deepalign.solvers.assignment import block_assignment, linear_assignment
from deepalign.solvers.method import Method, Options
from deepalign.solvers.wm import Scores, coordinate_descent


class CorrelationStats:
    """Streaming Pearson correlation between the columns of two sample streams ``(m, n)``."""

    def __init__(self, n: int, device: torch.device) -> None:
        z = dict(dtype=torch.float64, device=device)
        self.count = 0
        self.shift_a: Tensor | None = None
        self.shift_b: Tensor | None = None
        self.sa, self.sb = torch.zeros(n, **z), torch.zeros(n, **z)
        self.saa, self.sbb = torch.zeros(n, **z), torch.zeros(n, **z)
        self.sab = torch.zeros(n, n, **z)

    def update(self, xa: Tensor, xb: Tensor) -> None:
        xa, xb = xa.double(), xb.double()
        if self.shift_a is None:  # centre on the first batch: exact, and keeps sums small
            self.shift_a, self.shift_b = xa.mean(0), xb.mean(0)
        xa, xb = xa - self.shift_a, xb - self.shift_b
        self.count += xa.shape[0]
        self.sa += xa.sum(0)
        self.sb += xb.sum(0)
        self.saa += (xa * xa).sum(0)
        self.sbb += (xb * xb).sum(0)
        self.sab += xa.T @ xb

    def correlation(self, eps: float = 1e-12) -> tuple[Tensor, bool]:
        """The correlation matrix, and whether some unit never varied (a dead unit)."""
        if self.count == 0:
            raise DeepAlignError("am: no activations were recorded (empty data set?)")
        m = self.count
        ma, mb = self.sa / m, self.sb / m
        cov = self.sab / m - ma[:, None] * mb[None, :]
        sd_a = (self.saa / m - ma * ma).clamp_min(0).sqrt()
        sd_b = (self.sbb / m - mb * mb).clamp_min(0).sqrt()
        dead = bool((sd_a <= eps).any() or (sd_b <= eps).any())
        return cov / (sd_a[:, None] * sd_b[None, :] + eps), dead


def _as_samples(out: Tensor) -> Tensor:
    """``(batch, C, ...)`` -> ``(batch * ..., C)``: positions of a feature map are samples."""
    if out.dim() == 1:
        out = out.unsqueeze(0)
    return out.movedim(1, -1).reshape(-1, out.shape[1])


def _copy_with(module: nn.Module, state: StateDict, device: torch.device) -> nn.Module:
    net = copy.deepcopy(module).to(device)
    net.load_state_dict(state)
    return net.eval()


class _Observer:
    """Both networks' activations per probed group on a batch: ``(samples, n)`` each."""

    groups: list[str]

    def __call__(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release hooks."""


class _Hooks(_Observer):
    """Layer trees of :mod:`deepalign.core.arch`: forward hooks on each group's probe module."""

    def __init__(self, module: nn.Module, probes: dict[str, str], a, b, device) -> None:
        self.groups = list(probes)
        self.nets = [_copy_with(module, a, device), _copy_with(module, b, device)]
        self.seen: list[dict[str, Tensor]] = [{}, {}]
        self.handles = []
        for side, net in enumerate(self.nets):
            for g, path in probes.items():

                def hook(_m: nn.Module, _i: Any, out: Tensor, side=side, g=g) -> None:
                    self.seen[side][g] = out

                self.handles.append(net.get_submodule(path).register_forward_hook(hook))

    def __call__(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        for net in self.nets:
            net(x)
        a, b = ({g: _as_samples(s[g]) for g in self.groups} for s in self.seen)
        return a, b

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _Traced(_Observer):
    """Any traceable module: the traced graph's first nonlinearity after each group."""

    def __init__(
        self, module: nn.Module, traced: Traced, groups: list[str], a, b, device, streams: bool
    ) -> None:
        self.groups, self.traced, self.streams = groups, traced, streams
        self.nets = [(_copy_with(module, s, device), s) for s in (a, b)]

    def __call__(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        a, b = (self.traced.activations(net, s, x, self.streams) for net, s in self.nets)
        return a, b


def _observer(
    module: nn.Module,
    spec: PermutationSpec,
    a: StateDict,
    b: StateDict,
    device,
    x: Tensor,
    streams: bool = False,
) -> _Observer:
    """Hooks where the hand rules know the layers (our builders), else the tracer's probes."""
    try:
        probes = activation_probes(module)
    except DeepAlignError:
        probes = None
    if probes is not None and set(probes) <= set(spec.groups):
        return _Hooks(module, probes, a, b, device)
    traced = trace_model(copy.deepcopy(module).to(device).eval(), x[:2])
    groups = [
        g
        for g in [*traced.probes, *traced.inner]
        if traced.spec.groups.get(g) == spec.groups.get(g, -1)
    ]
    ties = spec.ties()  # an attention layer is matched by activations only if all of it is seen
    groups = [
        g for g in groups if g not in spec.heads or all(m in groups for m in ties[spec.heads[g]])
    ]
    return _Traced(module, traced, groups, a, b, device, streams)


@dataclass(frozen=True)
class AMOptions(Options):
    """Activation matching's options: examples per forward pass, an optional cap on passes, and
    ``streams``: observe a group that no nonlinearity sees (a transformer's residual stream) at
    every op that computes it, each standardised, instead of at the first (traced models only;
    ``docs/results.md`` says when it helped)."""

    solver: ClassVar[str] = "am"
    batch_size: int = 256
    max_batches: int | None = None
    streams: bool = False


def activation_matching(
    a: StateDict,
    b: StateDict,
    spec: PermutationSpec,
    *,
    module: nn.Module | None = None,
    data: Any = None,
    init: Permutation | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> tuple[Permutation, dict[str, Any]]:
    """Activation matching over ``data`` (a Dataset, a tensor of inputs or ``(x, y)``).

    Needs ``module`` (the architecture; weights come from ``a`` and ``b``). ``init`` only seeds the
    groups without a probe. ``options`` are :class:`AMOptions`. ``info`` has ``examples`` seen and
    ``mean_correlation`` per group.
    """
    o = AMOptions.make(**options)
    batch_size, max_batches = o.batch_size, o.max_batches
    if module is None:
        raise DeepAlignError("method 'am' needs the model's architecture (module=...)")
    if data is None:
        raise DeepAlignError("method 'am' needs data (activations over a data set)")
    device = next(iter(a.values())).device
    batches = labelled_batches(data, batch_size, device=device)
    try:
        first = next(iter(batches))
    except StopIteration:
        raise DeepAlignError("am: the data set is empty") from None
    observe = _observer(module, spec, a, b, device, first[0], o.streams)
    total = -(-n_examples(data) // batch_size)
    if max_batches is not None:
        total = min(total, max_batches)
    stats = {g: CorrelationStats(spec.groups[g], device) for g in observe.groups}
    examples = 0
    try:
        with torch.no_grad():
            for i, (x, _) in enumerate(labelled_batches(data, batch_size, device=device)):
                if max_batches is not None and i >= max_batches:
                    break
                seen_a, seen_b = observe(x)
                for g, st in stats.items():
                    st.update(seen_a[g], seen_b[g])
                examples += x.shape[0]
                if progress is not None:
                    progress(i + 1, total)
    except RuntimeError as exc:
        raise DeepAlignError(
            f"am: the data does not fit the model ({str(exc).splitlines()[0][:100]})"
        ) from None
    finally:
        observe.close()
    probes = observe.groups
    perm: Permutation = (
        {g: p.to(device) for g, p in init.items()}
        if init is not None
        else {g: torch.arange(n, device=device) for g, n in spec.groups.items()}
    )
    corr, dead = {}, []
    for g, st in stats.items():
        corr[g], has_dead = st.correlation()
        if g in spec.heads:
            continue  # below, with the other groups of its attention layer
        perm[g] = linear_assignment(corr[g]).to(device)
        if has_dead:
            dead.append(g)
    for h, members in spec.ties().items():  # heads: one order, a matching inside every head
        if not set(members) <= set(corr):
            continue  # not seen by any op: weight matching below
        order, perms, _ = block_assignment([corr[g] for g in members], spec.groups[h])
        perm[h] = order.to(device)
        perm.update({g: q.to(device) for g, q in zip(members, perms, strict=True)})
    if dead:  # break the ties of dead units by weights, other groups at the answer above
        scores = Scores(a, b, spec, dead)
        fixed = dict(perm)
        for g in dead:
            w = scores.score(g, fixed).double().to(corr[g].device)
            perm[g] = linear_assignment(corr[g] + 1e-6 * w / (w.abs().max() + 1e-30)).to(device)
    mean_corr = {
        g: float(c.gather(1, perm[g].unsqueeze(1).to(c.device)).mean()) for g, c in corr.items()
    }
    info: dict[str, Any] = {
        "iterations": 1,
        "examples": examples,
        "mean_correlation": mean_corr,
        "groups_with_dead_units": dead,
    }
    seen = set(probes) | {h for h, ms in spec.ties().items() if set(ms) <= set(probes)}
    rest = [g for g in spec.groups if g not in seen]
    if rest:
        perm, wm_info = coordinate_descent(a, b, spec, perm, seed, groups=rest, history=False)
        info["wm_groups"] = rest
    return perm, info


METHOD = Method(
    "am",
    activation_matching,
    options=AMOptions,
    needs_data=True,
    reports_progress=True,
    help="activation matching: correlations of hidden activations over data",
)
