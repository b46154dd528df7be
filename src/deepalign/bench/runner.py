"""``run_bench``: every method on the same held-out pairs of a zoo; barrier, AUC, time, curves.

For each seed ``k`` the pairs are re-drawn from the test split (seeded by ``(seed, k)``) and every
method aligns the same pairs; solver seeds derive from ``(seed, k, pair)``. Per pair the bench
records the LMC barrier and AUC of the loss, the loss and accuracy at lam = 0.5, the weight-matching
objective ``sum <a, aligned b>`` and the L2 distance reached, and the seconds spent. A method that
fails is recorded with its error and the run goes on. Results are written by
:func:`deepalign.bench.report.write_outputs`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from deepalign.bench.evaluate import TaskData, pair_curves, task_data, value_at
from deepalign.bench.methods import (
    SINKHORN_CHUNK,
    Context,
    MethodRun,
    identity_start,
    run_method,
    warm_up,
)
from deepalign.bench.pairs import candidate_pairs, draw_pairs
from deepalign.bench.resume import PartialRuns, model_digest, run_key
from deepalign.bench.stats import mean_std
from deepalign.core import permutation as P
from deepalign.core.functional import unstack_state
from deepalign.errors import DeepAlignError
from deepalign.solvers.objective import l2_distance, weight_inner
from deepalign.solvers.registry import check_options, resolve
from deepalign.zoo.loader import Zoo
from deepalign.zoo.seeds import derive_seed

DEFAULT_METHODS = (
    "identity",
    "wm",
    "am",
    "sinkhorn",
    "wm+sinkhorn",
    "deepalign",
    "deepalign+wm",
    "deepalign+sinkhorn",
)
LABELS = {
    "identity": "Naive (identity)",
    "wm": "Weight Matching",
    "am": "Activation Matching",
    "sinkhorn": "Sinkhorn",
    "wm+sinkhorn": "WM + Sinkhorn",
    "deepalign": "Deep-Align",
    "deepalign+wm": "Deep-Align + WM",
    "deepalign+sinkhorn": "Deep-Align + Sinkhorn",
}
METRICS = ("barrier", "auc", "loss_mid", "acc_mid", "objective", "l2", "seconds")
ProgressFn = Callable[[dict[str, Any]], None]


def label(method: str) -> str:
    return LABELS.get(method, method)


def trajectory_steps(steps: int) -> list[int]:
    """Roughly log-spaced Sinkhorn steps at which the hard permutation is recorded (0 and ``steps``
    included)."""
    grid = {0, steps}
    for decade in (1, 10, 100, 1000, 10_000, 100_000):
        grid |= {m * decade for m in (1, 2, 5)}
    return sorted(s for s in grid if s <= steps)


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from ``"a,b,c"`` or a list; duplicates dropped, order kept; unknown -> error."""
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    out: list[str] = []
    for m in (str(x).strip() for x in items):
        if not m:
            continue
        resolve(m)  # one-line error for unknown names
        if m not in out:
            out.append(m)
    if not out:
        raise DeepAlignError("--methods: no method given")
    return out


def _needs_aligner(method: str) -> bool:
    return any(p.strip().startswith("deepalign") for p in method.split("+"))


def load_aligner(aligner: Any, zoo: Zoo, device: torch.device) -> Any:
    """The aligner as a model on ``device``, checked against the zoo's architecture."""
    from deepalign.nn.model import DeepAlign
    from deepalign.nn.pretrained import check_arch, load_pretrained

    if isinstance(aligner, DeepAlign):
        model = aligner.to(device).eval()
        where = "aligner"
    else:
        model = load_pretrained(aligner, device)
        where = str(aligner)
    check_arch(model, zoo.config, where)
    mine, theirs = model.layout.spec, zoo.spec
    if not mine.same_structure(theirs) or set(mine.groups) != set(theirs.groups):
        widths = "-".join(map(str, model.layout.widths))
        raise DeepAlignError(
            f"{where}: the aligner was trained for networks of widths {widths}; the zoo "
            f"{zoo.path} has groups {dict(theirs.groups)}"
        )
    return model


def check_out(out: str | os.PathLike) -> Path:
    """Refuse an output folder that cannot be written, before any work (no partial output)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DeepAlignError(f"{out}: exists and is not a folder (--out takes a folder)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise DeepAlignError(f"{out}: cannot write here ({probe} is not a writable folder)")
    return out


def _pair_seeds(seed: int, k: int, n: int) -> list[int]:
    return [derive_seed(seed, "bench-solver", k, i) % 2**31 for i in range(n)]


def _records(
    run: MethodRun,
    a: Mapping[str, torch.Tensor],
    b_aligned: Mapping[str, torch.Tensor],
    curves: Mapping[str, Any],
    pairs: Sequence[tuple[int, int]],
    k: int,
    spec: Any,
) -> list[dict[str, Any]]:
    lam = curves["lambdas"]
    loss_mid = value_at(lam, curves["loss"])
    acc_mid = None if curves["accuracy"] is None else value_at(lam, curves["accuracy"])
    rows = []
    for i, (ia, ib) in enumerate(pairs):
        ai, bi = unstack_state(a, i), unstack_state(b_aligned, i)
        rows.append(
            {
                "seed": k,
                "pos": i,
                "a": int(ia),
                "b": int(ib),
                "barrier": float(curves["barrier"][i]),
                "auc": float(curves["auc"][i]),
                "loss_mid": float(loss_mid[i]),
                "acc_mid": None if acc_mid is None else float(acc_mid[i]),
                "objective": weight_inner(ai, bi, spec),
                "l2": l2_distance(ai, bi, spec),
                "seconds": float(run.seconds[i]),
            }
        )
    return rows


def summarise(rows: Sequence[Mapping[str, Any]], seeds: int) -> dict[str, Any]:
    """Mean and std of every metric over all (pair, seed) records, plus per-seed means."""
    out: dict[str, Any] = {}
    for key in METRICS:
        vals = [r[key] for r in rows if r.get(key) is not None]
        if not vals:
            out[key] = None
            continue
        per_seed = [
            mean_std([r[key] for r in rows if r["seed"] == k and r.get(key) is not None])["mean"]
            for k in range(seeds)
        ]
        out[key] = {**mean_std(vals), "seed_means": per_seed}
    return out


def _mean_curve(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    loss = torch.cat([r["loss"] for r in records])
    acc = None if records[0]["accuracy"] is None else torch.cat([r["accuracy"] for r in records])
    return {
        "lambdas": [float(x) for x in records[0]["lambdas"]],
        "loss": loss.mean(0).tolist(),
        "loss_std": (loss.std(0) if loss.shape[0] > 1 else torch.zeros_like(loss[0])).tolist(),
        "accuracy": None if acc is None else acc.mean(0).tolist(),
    }


class _Bench:
    """One bench run's fixed inputs: pairs and their weights per seed, data, solver context."""

    def __init__(
        self,
        zoo: Zoo,
        ctx: Context,
        data: TaskData,
        drawn: list[list[tuple[int, int]]],
        points: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.zoo, self.ctx, self.data, self.drawn = zoo, ctx, data, drawn
        self.points, self.seed = points, seed
        self.a = [zoo.load([p[0] for p in d], device) for d in drawn]
        self.b = [zoo.load([p[1] for p in d], device) for d in drawn]

    def run(self, method: str, k: int, tell: Callable[..., None]) -> dict[str, Any]:
        """Align seed ``k``'s pairs with ``method`` and evaluate them: the record of that run."""
        a, b, pairs = self.a[k], self.b[k], self.drawn[k]
        n = len(pairs)
        if k == 0:
            warm_up(method, a, b, self.ctx)
        run = run_method(method, a, b, self.ctx, _pair_seeds(self.seed, k, n), on_pair=tell)
        tell(n, "lmc")
        aligned = P.apply(self.ctx.spec, run.perm, b, batch_dims=1)
        curves = pair_curves(self.ctx.module, a, aligned, pairs, self.data, self.points)
        return {
            "rows": _records(run, a, aligned, curves, pairs, k, self.ctx.spec),
            "lambdas": curves["lambdas"],
            "loss": curves["loss"],
            "accuracy": curves["accuracy"],
            "timing": run.timing,
            "first_seconds": run.first_seconds,
            "trajectories": run.trajectories,
        }

    def identity_trajectories(self, k: int) -> list[list[tuple[int, Any]]]:
        """Seed ``k``'s traced pairs aligned by Sinkhorn started from the identity."""
        n = len(self.drawn[k])
        return identity_start(self.a[k], self.b[k], self.ctx, _pair_seeds(self.seed, k, n))

    def trajectory_curve(self, records: list[tuple[dict[str, Any], int]]) -> dict[str, Any] | None:
        """Barrier (mean, std over the traced pairs of every seed) at each recorded Sinkhorn step."""
        per_step: dict[int, list[float]] = {}
        spec = self.ctx.spec
        for rec, k in records:
            trajs = rec["trajectories"]
            if not trajs:
                continue
            steps = [s for s, _ in trajs[0]]
            if any([s for s, _ in tr] != steps for tr in trajs):
                continue
            t = len(trajs)
            a = {key: v[:t] for key, v in self.a[k].items()}
            b = {key: v[:t] for key, v in self.b[k].items()}
            device = next(iter(b.values())).device
            for j, step in enumerate(steps):
                perm = {
                    g: torch.stack([tr[j][1][g] for tr in trajs]).to(device) for g in spec.groups
                }
                aligned = P.apply(spec, perm, b, batch_dims=1)
                curves = pair_curves(
                    self.ctx.module, a, aligned, self.drawn[k][:t], self.data, self.points
                )
                per_step.setdefault(int(step), []).extend(float(x) for x in curves["barrier"])
        if not per_step:
            return None
        steps = sorted(per_step)
        stats = [mean_std(per_step[s]) for s in steps]
        return {
            "steps": steps,
            "barrier_mean": [s["mean"] for s in stats],
            "barrier_std": [s["std"] for s in stats],
            "pairs": len(per_step[steps[0]]),
        }


def _error_text(exc: Exception) -> str:
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else ""
    if not isinstance(exc, DeepAlignError):
        msg = f"{type(exc).__name__}: {msg}"
    return msg[:300]


def run_bench(
    zoo: Zoo | str | os.PathLike,
    aligner: Any,
    out: str | os.PathLike | None,
    pairs: int = 100,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    seeds: int = 1,
    points: int = 25,
    sinkhorn_steps: int = 200,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
    *,
    seed: int = 0,
    data_examples: int = 2000,
    eval_examples: int | None = None,
    trajectory_pairs: int = 16,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    sinkhorn_chunk: int = SINKHORN_CHUNK,
) -> dict[str, Any]:
    """Benchmark ``methods`` on held-out test pairs of ``zoo``; writes the outputs to ``out``.

    ``aligner``: an aligner folder or a loaded ``DeepAlign`` (may be None when no ``deepalign*``
    method runs). ``data_examples``: training examples that ``am`` (and Sinkhorn's task loss)
    see; ``eval_examples``: test examples of the curves (None: the whole test split).
    ``trajectory_pairs``: pairs per seed whose Sinkhorn trajectories feed ``sinkhorn_init.png``.
    ``options``: extra solver options per method, e.g. ``{"sinkhorn": {"lr": 0.05}}``.
    ``sinkhorn_chunk``: pairs per batched Sinkhorn run (0: pair by pair through the registry);
    pairs share the data order within a run, so it is part of the results' settings.
    ``on_progress(event)`` gets dicts with ``method``, ``seed``, ``run``, ``runs``, ``done``,
    ``total`` and ``stage`` as the work advances. Every bad input is refused before any work.
    A killed run resumes from its finished (method, seed) runs (``bench.partial.pt`` in ``out``).
    Returns the result written to ``bench.json``.
    """
    from deepalign.bench.report import write_outputs

    if pairs <= 0 or seeds <= 0:
        raise DeepAlignError(f"--pairs and --seeds must be positive, got {pairs} and {seeds}")
    if points < 2:
        raise DeepAlignError(f"--points must be at least 2, got {points}")
    if sinkhorn_steps < 1:
        raise DeepAlignError(f"--sinkhorn-steps must be at least 1, got {sinkhorn_steps}")
    if data_examples <= 0 or (eval_examples is not None and eval_examples <= 0):
        raise DeepAlignError("--data-examples and --eval-examples must be positive")
    if trajectory_pairs < 0:
        raise DeepAlignError(f"--trajectory-pairs must be >= 0, got {trajectory_pairs}")
    if sinkhorn_chunk < 0:
        raise DeepAlignError(f"sinkhorn_chunk must be >= 0, got {sinkhorn_chunk}")
    method_list = parse_methods(methods)
    options = {m: dict(o) for m, o in (options or {}).items()}
    unknown = sorted(set(options) - set(method_list))
    if unknown:
        raise DeepAlignError(f"options given for methods not in the run: {', '.join(unknown)}")
    for m, opts in options.items():
        check_options(m, opts)  # names and value types, before any work
    out_path = check_out(out) if out is not None else None
    dev = torch.device(device)
    z = zoo if isinstance(zoo, Zoo) else Zoo(zoo)
    need = [m for m in method_list if _needs_aligner(m)]
    if need and aligner is None:
        raise DeepAlignError(f"method(s) {', '.join(need)} need a trained aligner (--aligner DIR)")
    model = None if aligner is None else load_aligner(aligner, z, dev)  # checked even if unused
    candidates = candidate_pairs(z)
    drawn = [draw_pairs(candidates, pairs, seed, k) for k in range(seeds)]
    involved = sorted({i for d in drawn for p in d for i in p})
    data = task_data(z, involved, dev, data_examples, eval_examples, seed)
    sinkhorn_opts: dict[str, Any] = {
        "steps": sinkhorn_steps,
        "trajectory_steps": trajectory_steps(sinkhorn_steps),
    }
    if not data.is_classifier:
        sinkhorn_opts["loss"] = "l2"
    ctx = Context(
        spec=z.spec,
        module=z.module().to(dev),
        solver_data=data.solver_data,
        aligner=model,
        options=options,
        sinkhorn=sinkhorn_opts,
        trajectory_pairs=trajectory_pairs,
        sinkhorn_chunk=sinkhorn_chunk,
    )
    settings = {
        "zoo": str(z.path),
        "task": z.task,
        "kind": z.kind,
        "architecture": z.config,
        "aligner": None if model is None else _aligner_name(aligner),
        "aligner_used": bool(need),
        "methods": method_list,
        "pairs_requested": pairs,
        "pairs": len(drawn[0]),
        "pairs_available": len(candidates),
        "pair_kind": "two views of one target"
        if (z.kind != "classifier" and z.plan.views >= 2)
        else "two distinct test networks",
        "seeds": seeds,
        "seed": seed,
        "points": points,
        "loss": data.loss_name,
        "eval_split": "test" if data.is_classifier else "INR coordinates",
        "eval_examples": data.eval_examples,
        "data_examples": data.solver_examples,
        "data_split": "train" if data.is_classifier else "INR coordinates",
        "sinkhorn_steps": sinkhorn_steps,
        "sinkhorn_loss": "task (cross-entropy at random lam)" if data.is_classifier else "l2",
        "sinkhorn_chunk": sinkhorn_chunk,
        "trajectory_steps": sinkhorn_opts["trajectory_steps"],
        "trajectory_pairs": min(trajectory_pairs, len(drawn[0])),
        "options": {m: {k: _jsonable(v) for k, v in o.items()} for m, o in options.items()},
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    key = run_key(
        [
            {k: v for k, v in settings.items() if k not in ("threads", "methods")},
            z.plan.fingerprint,
            drawn,
            model_digest(model),
        ]
    )
    partial = PartialRuns(out_path, key)
    bench = _Bench(z, ctx, data, drawn, points, seed, dev)
    runs_total = len(method_list) * seeds
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    traced: dict[str, list[tuple[dict[str, Any], int]]] = {}
    resumed = 0
    run_no = 0
    for method in method_list:
        entry: dict[str, Any] = {"method": method, "label": label(method), "status": "ok"}
        records: list[dict[str, Any]] = []
        for k in range(seeds):
            event = {"method": method, "seed": k, "run": run_no, "runs": runs_total}
            event["total"] = len(drawn[k]) + 1

            def tell(done: int, stage: str = "align", event=event) -> None:
                if on_progress is not None:
                    on_progress({**event, "done": done, "stage": stage})

            tell(0)
            rec = partial.get(method, k)
            if rec is not None:
                resumed += 1
            else:
                try:
                    rec = bench.run(method, k, tell)
                except Exception as exc:  # noqa: BLE001 - a failing method is reported; the run goes on
                    entry.update(status="failed", error=_error_text(exc), failed_seed=k)
                    run_no += seeds - k
                    tell(event["total"], "failed")
                    break
                partial.put(method, k, rec)
            records.append(rec)
            tell(event["total"], "done")
            run_no += 1
        if entry["status"] == "ok":
            rows = [r for rec in records for r in rec["rows"]]
            entry["timing"] = records[0]["timing"]
            if records[0].get("first_seconds"):
                entry["first_stage_seconds_per_pair"] = [rec["first_seconds"] for rec in records]
            entry["summary"] = summarise(rows, seeds)
            entry["curve"] = _mean_curve(records)
            entry["pairs"] = rows
            if any(rec["trajectories"] for rec in records):
                traced[method] = [(rec, k) for k, rec in enumerate(records)]
        results[method] = entry
    trajectories: dict[str, Any] = {}
    for method, recs in traced.items():
        event = {"method": method, "seed": 0, "run": run_no, "runs": runs_total, "total": 1}
        if on_progress is not None:
            on_progress({**event, "done": 0, "stage": "sinkhorn trajectory"})
        curve = bench.trajectory_curve(recs)
        if curve is not None:
            trajectories[method] = {**curve, "start": _start(method)}
        if on_progress is not None:
            on_progress({**event, "done": 1, "stage": "sinkhorn trajectory"})
    if traced and "identity+sinkhorn" not in method_list:
        curve = _identity_curve(bench, seeds, run_no, runs_total, on_progress)
        if curve is not None:
            trajectories["identity+sinkhorn"] = curve
    result = {
        "format": "deepalign-bench/1",
        "settings": settings,
        "pair_draws": [[list(p) for p in d] for d in drawn],
        "methods": results,
        "sinkhorn_init": trajectories,
        "resumed_runs": resumed,
        "wall_seconds": time.perf_counter() - started,
    }
    if out_path is not None:
        write_outputs(out_path, result)
        partial.finish()
    return result


def _identity_curve(
    bench: _Bench, seeds: int, run_no: int, runs_total: int, on_progress: ProgressFn | None
) -> dict[str, Any] | None:
    """Barrier vs Sinkhorn steps from the identity (the start the from-scratch row does not show:
    that one starts from near-uniform scores); None when it cannot run (e.g. a broken option)."""
    event = {"method": "identity+sinkhorn", "seed": 0, "run": run_no, "runs": runs_total}
    if on_progress is not None:
        on_progress({**event, "total": seeds, "done": 0, "stage": "sinkhorn from identity"})
    recs = []
    try:
        for k in range(seeds):
            recs.append(({"trajectories": bench.identity_trajectories(k)}, k))
            if on_progress is not None:
                on_progress(
                    {**event, "total": seeds, "done": k + 1, "stage": "sinkhorn from identity"}
                )
    except Exception:  # noqa: BLE001 - an extra curve; the Sinkhorn rows report their own errors
        return None
    curve = bench.trajectory_curve(recs)
    return None if curve is None else {**curve, "start": "identity", "label": "Sinkhorn"}


def _start(method: str) -> str:
    """What a Sinkhorn chain starts from: the methods before the last, or none."""
    return "+".join(p.strip() for p in method.split("+")[:-1]) or "none"


def _aligner_name(aligner: Any) -> str:
    return str(aligner) if isinstance(aligner, (str, os.PathLike)) else "in-memory model"


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v)
