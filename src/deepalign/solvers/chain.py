"""Method chains (``"deepalign+sinkhorn"``) and the one executor that runs them.

:class:`Chain` is the only place a method string is split: its stages are registered
:class:`~deepalign.solvers.method.Method` records, and it answers what the chain needs (data, an
aligner) and which options it takes. :func:`run_chain` aligns N stacked pairs stage by stage: a stage
with a batched form runs on chunks of pairs (Deep-Align: one forward pass; Sinkhorn: one optimisation
of many pairs), any other stage pair by pair; each stage starts from the previous stage's
permutation (``init``) and, when it takes them, its soft scores (``init_scores``). :func:`align` is
the one-pair call every user-facing verb ends in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deepalign.core import permutation as P
from deepalign.core.permutation import Permutation
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.errors import DeepAlignError
from deepalign.solvers import registry
from deepalign.solvers.method import NEXT_SCORES, Method
from deepalign.solvers.objective import l2_distance, weight_inner

BATCHED_KIND, PER_PAIR_KIND = "batched (amortised)", "per pair"


@dataclass(frozen=True)
class Chain:
    """One method or a chain ``"a+b+..."`` of registered methods."""

    text: str
    stages: tuple[Method, ...]

    @classmethod
    def parse(cls, method: str | Chain) -> Chain:
        """The chain named by ``method``; an unknown or empty name is a one-line error."""
        if isinstance(method, Chain):
            return method
        parts = [p.strip() for p in str(method).split("+")]
        if not all(parts):
            raise DeepAlignError(f"method {method!r}: empty name in chain")
        return cls("+".join(parts), tuple(registry.get(p) for p in parts))

    def __str__(self) -> str:
        return self.text

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.stages]

    @property
    def needs_data(self) -> bool:
        """Some stage cannot run without data."""
        return any(m.needs_data for m in self.stages)

    @property
    def uses_data(self) -> bool:
        """Some stage reads data when it is given (e.g. Sinkhorn's task loss)."""
        return any(m.uses_data for m in self.stages)

    @property
    def needs_aligner(self) -> bool:
        return any(m.needs_aligner for m in self.stages)

    @property
    def start(self) -> str:
        """What the last stage starts from: the stages before it, or ``"none"``."""
        return "+".join(self.names[:-1]) or "none"

    def option_names(self) -> set[str]:
        return set().union(*(m.options.names() for m in self.stages))

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Each option must be declared by some stage, with the type every such stage declares."""
        unknown = sorted(set(options) - self.option_names())
        if unknown:
            known = ", ".join(sorted(self.option_names())) or "none"
            raise DeepAlignError(
                f"method {self.text!r}: unknown option(s) {', '.join(unknown)} (options: {known})"
            )
        for m in self.stages:
            mine = {k: v for k, v in options.items() if k in m.options.names()}
            m.options.check(mine, where=f"method {self.text!r}")

    def options_for(self, stage: Method, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options among ``options`` that ``stage`` declares."""
        return {k: v for k, v in options.items() if k in stage.options.names()}

    def check_inputs(self, data: Any, aligner: Any) -> None:
        """One-line errors when a stage needs data or an aligner that is not there."""
        missing = [m.name for m in self.stages if m.needs_data]
        if missing and data is None:
            raise DeepAlignError(
                f"method {self.text!r} needs data ({', '.join(missing)} uses activations or the "
                "task loss): pass data=(x, y)"
            )
        if self.needs_aligner and aligner is None:
            raise DeepAlignError(
                f"method {self.text!r} needs a trained aligner: "
                "aligner=DeepAlign.from_pretrained(folder)"
            )


@dataclass
class ChainRun:
    """What :func:`run_chain` returns for N pairs."""

    perm: Permutation  # (N, n) per group
    seconds: list[float]  # per pair, the sum of its stages' (batched stages: amortised)
    kinds: list[str]  # per stage: BATCHED_KIND or PER_PAIR_KIND
    stage_seconds: list[list[float]]  # per stage, per pair
    infos: list[list[dict[str, Any]]]  # per pair, per stage: the solver's info (with "method")

    @property
    def timing(self) -> str:
        """Each stage's kind joined by " + "."""
        return " + ".join(self.kinds)

    @property
    def first_seconds(self) -> float:
        """The first stage's mean seconds per pair when there are several stages, else 0."""
        if len(self.stage_seconds) < 2:
            return 0.0
        return sum(self.stage_seconds[0]) / len(self.stage_seconds[0])


def _rows(stacked: Mapping[str, Tensor], s: int, e: int) -> dict[str, Tensor]:
    return {k: v[s:e] for k, v in stacked.items()}


def _run_stage(
    stage: Method,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    spec: PermutationSpec,
    module: nn.Module | None,
    data: Any,
    aligner: Any,
    seeds: Sequence[int],
    opts: dict[str, Any],
    init: Permutation | None,
    scores: Mapping[str, Tensor] | None,
    chunk: int,
    tell: Callable[[int], None],
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Permutation, list[float], list[dict[str, Any]], str]:
    n = len(seeds)
    extra: dict[str, Any] = {}
    if stage.reports_progress and progress is not None:
        extra["progress"] = lambda done, total: progress(stage.name, done, total)
    if stage.needs_aligner:
        extra["aligner"] = aligner
    if stage.takes_scores and scores is not None:
        extra["init_scores"] = scores
    used = data if stage.uses_data else None
    seconds: list[float] = []
    infos: list[dict[str, Any]] = []
    if stage.solve_batch is not None and chunk > 0:
        perms = []
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            start = time.perf_counter()
            part_extra = {
                k: ({g: q[s:e] for g, q in v.items()} if k == "init_scores" else v)
                for k, v in extra.items()
            }
            perm, part = stage.solve_batch(
                _rows(a, s, e),
                _rows(b, s, e),
                spec,
                module=module,
                data=used,
                init=None if init is None else {g: p[s:e] for g, p in init.items()},
                seed=int(seeds[s]),
                pair_seeds=[int(x) for x in seeds[s:e]],
                **part_extra,
                **opts,
            )
            seconds += [(time.perf_counter() - start) / (e - s)] * (e - s)
            infos += part
            perms.append(perm)
            tell(e)
        out = {g: torch.cat([p[g] for p in perms]) for g in perms[0]}
        return out, seconds, infos, BATCHED_KIND
    rows: list[Permutation] = []
    for i in range(n):
        one = {
            k: ({g: q[i] for g, q in v.items()} if k == "init_scores" else v)
            for k, v in extra.items()
        }
        start = time.perf_counter()
        perm, info = stage.solve(
            {k: v[i] for k, v in a.items()},
            {k: v[i] for k, v in b.items()},
            spec,
            module=module,
            data=used,
            init=None if init is None else {g: p[i] for g, p in init.items()},
            seed=int(seeds[i]),
            **one,
            **opts,
        )
        seconds.append(time.perf_counter() - start)
        infos.append(info)
        rows.append(perm)
        tell(i + 1)
    out = {g: torch.stack([p[g] for p in rows]) for g in rows[0]}
    return out, seconds, infos, PER_PAIR_KIND


def run_chain(
    method: str | Chain,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    seeds: Sequence[int],
    module: nn.Module | None = None,
    data: Any = None,
    aligner: Any = None,
    init: Permutation | None = None,
    options: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
    chunks: Mapping[str, int] | None = None,
    on_pair: Callable[[int], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ChainRun:
    """Align N stacked pairs ``(a[i], b[i])`` (B into A's basis) with a method or chain.

    ``seeds[i]`` seeds pair i's solvers (a batched stage seeds its shared data order with the
    chunk's first seed). ``options`` go to every stage that declares them; ``defaults`` holds
    per-method settings under the user's options (e.g. ``{"sinkhorn": {"steps": 200}}``);
    ``chunks`` overrides a method's pairs per batched call (0: pair by pair). ``on_pair(done)``
    reports progress over all stages (``done`` out of N); ``progress(stage, done, total)`` the
    steps inside a stage that reports them (Sinkhorn's steps, activation matching's batches).
    """
    chain = Chain.parse(method)
    options = dict(options or {})
    chain.check_options(options)
    chain.check_inputs(data, aligner)
    n = next(iter(a.values())).shape[0]
    if len(seeds) != n:
        raise DeepAlignError(f"run_chain: {n} pairs but {len(seeds)} seeds")
    perm, scores = init, None
    kinds: list[str] = []
    stage_seconds: list[list[float]] = []
    infos: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    n_stages = len(chain.stages)
    for k, stage in enumerate(chain.stages):
        opts = {**(defaults or {}).get(stage.name, {}), **chain.options_for(stage, options)}
        chunk = (chunks or {}).get(stage.name, stage.batch_chunk)

        def tell(done: int, k: int = k) -> None:
            if on_pair is not None:
                on_pair((k * n + done) // n_stages)

        perm, seconds, stage_infos, kind = _run_stage(
            stage,
            a,
            b,
            spec,
            module,
            data,
            aligner,
            seeds,
            opts,
            perm,
            scores,
            chunk,
            tell,
            progress,
        )
        next_scores = [info.pop(NEXT_SCORES, None) for info in stage_infos]
        scores = (
            {g: torch.stack([s[g] for s in next_scores]) for g in next_scores[0]}
            if next_scores and all(s is not None for s in next_scores)
            else None
        )
        for i, info in enumerate(stage_infos):
            infos[i].append({"method": stage.name, **info})
        kinds.append(kind)
        stage_seconds.append(seconds)
    assert perm is not None
    seconds = [sum(col) for col in zip(*stage_seconds, strict=True)]
    return ChainRun(perm, seconds, kinds, stage_seconds, infos)


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
    method: str | Chain = "wm",
    *,
    module: nn.Module | None = None,
    data: Any = None,
    init: Permutation | None = None,
    seed: int = 0,
    aligner: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
    **options: Any,
) -> tuple[Permutation, dict[str, Any]]:
    """Permutation bringing ``b`` into ``a``'s basis, and an info dict.

    ``info`` holds ``method``, ``objective`` (``sum_k <a_k, aligned b_k>``), ``objective_before``,
    ``l2`` and ``l2_before`` (weight distances), ``iterations``, ``seconds``, and each method's own
    entries (for a chain, ``parts`` lists them in order). ``options`` go to every stage that
    declares them; an option no stage declares is an error. ``aligner``: a loaded Deep-Align model
    (``DeepAlign.from_pretrained``) for ``deepalign*`` methods. ``progress(stage, done, total)``
    hears the steps of stages that report them.
    """
    chain = Chain.parse(method)
    chain.check_inputs(data, aligner)
    spec.check(a, where="A")
    spec.check(b, where="B")
    for name, state in (("A", a), ("B", b)):
        for k, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DeepAlignError(f"{name}: tensor {k} holds NaN or inf values")
    chain.check_options(options)
    device = next(iter(a.values())).device
    first = None if init is None else _check_init(spec, init, device)
    start = time.perf_counter()
    run = run_chain(
        chain,
        {k: v.unsqueeze(0) for k, v in a.items()},
        {k: v.unsqueeze(0) for k, v in b.items()},
        spec,
        seeds=[seed],
        module=module,
        data=data,
        aligner=aligner,
        init=None if first is None else {g: p.unsqueeze(0) for g, p in first.items()},
        options=options,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    perm = {g: p[0].to(device) for g, p in run.perm.items()}
    parts = run.infos[0]
    aligned = P.apply(spec, perm, b)
    out: dict[str, Any] = dict(parts[0]) if len(parts) == 1 else {"parts": parts}
    out.update(
        method=chain.text,
        objective=weight_inner(a, aligned, spec),
        objective_before=weight_inner(a, b, spec),
        l2=l2_distance(a, aligned, spec),
        l2_before=l2_distance(a, b, spec),
        iterations=sum(int(i.get("iterations", 0)) for i in parts),
        seconds=seconds,
    )
    return perm, out
