"""``run_bench``: every method on the same held-out pairs of a zoo; barrier, AUC, time, curves.

For each seed ``k`` the pairs are re-drawn from the test split (seeded by ``(seed, k)``) and every
method aligns the same pairs; solver seeds derive from ``(seed, k, pair)``. Per pair the bench
records the LMC barrier and AUC of the loss, the loss and accuracy at lam = 0.5, the weight-matching
objective ``sum <a, aligned b>`` and the L2 distance reached, and the seconds spent. A method that
fails is recorded with its error and the run goes on. Results are written by
:func:`deepalign.bench.report.write_outputs`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepalign.bench.checks import (
    check_numbers,
    check_options,
    check_out,
    load_aligner,
    parse_methods,
)
from deepalign.bench.evaluate import TaskData, pair_curves, task_data, value_at
from deepalign.bench.gap import gap_closed
from deepalign.bench.pairs import candidate_pairs, draw_pairs, shard_positions
from deepalign.bench.resume import (
    PartialRuns,
    gather_shards,
    model_digest,
    run_key,
    shard_file,
)
from deepalign.bench.runs import Context, MethodRun, run_method, warm_up
from deepalign.bench.stats import mean_std
from deepalign.bench.trajectories import identity_curve, trajectory_curve, trajectory_steps
from deepalign.core import permutation as P
from deepalign.core.functional import unstack_state
from deepalign.core.seeds import derive_seed
from deepalign.errors import DeepAlignError
from deepalign.solvers import Chain
from deepalign.solvers.objective import l2_distance, weight_inner
from deepalign.solvers.sinkhorn import SINKHORN_CHUNK
from deepalign.zoo.build import ShardSlice
from deepalign.zoo.loader import Zoo

__all__ = ["DEFAULT_METHODS", "LABELS", "BenchConfig", "check_out", "parse_methods", "run_bench"]

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
    "sinkhorn-paper": "Sinkhorn (official code's settings)",
    "wm+sinkhorn": "WM + Sinkhorn",
    "deepalign": "Deep-Align",
    "deepalign+wm": "Deep-Align + WM",
    "deepalign+sinkhorn": "Deep-Align + Sinkhorn",
}
METRICS = ("barrier", "auc", "loss_mid", "acc_mid", "objective", "l2", "seconds")
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class BenchConfig:
    """What a bench run does (each field is a ``deepalign bench`` flag).

    ``data_examples``: training examples that ``am`` (and Sinkhorn's task loss) see;
    ``eval_examples``: test examples of the curves (None: the whole test split);
    ``trajectory_pairs``: pairs per seed whose Sinkhorn trajectories feed ``sinkhorn_init.png``;
    ``options``: extra solver options per method, e.g. ``{"sinkhorn": {"lr": 0.05}}``;
    ``sinkhorn_chunk``: pairs per batched Sinkhorn run (0: pair by pair); pairs share the data
    order within a run, so it is part of the results' settings.
    """

    pairs: int = 100
    methods: str | Sequence[str] = DEFAULT_METHODS
    seeds: int = 1
    points: int = 25
    sinkhorn_steps: int = 200
    device: str | torch.device = "cpu"
    seed: int = 0
    data_examples: int = 2000
    eval_examples: int | None = None
    trajectory_pairs: int = 16
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    sinkhorn_chunk: int = SINKHORN_CHUNK
    shard: str | None = None  # "i/n" or "auto": this job's share of every seed's pairs
    gather: bool = False  # only assemble the outputs from the shards' finished runs


def label(method: str) -> str:
    return LABELS.get(method, method)


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
        aligner: Any,
        cfg: BenchConfig,
        method_list: list[str],
        part: ShardSlice = ShardSlice(),
    ) -> None:
        self.zoo, self.cfg, self.methods, self.part = zoo, cfg, method_list, part
        self.points, self.seed = cfg.points, cfg.seed
        device = torch.device(cfg.device)
        need = [m for m in method_list if Chain.parse(m).needs_aligner]
        if need and aligner is None:
            raise DeepAlignError(
                f"method(s) {', '.join(need)} need a trained aligner (--aligner DIR)"
            )
        model = None if aligner is None else load_aligner(aligner, zoo, device)  # even if unused
        candidates = candidate_pairs(zoo)
        self.drawn = [draw_pairs(candidates, cfg.pairs, cfg.seed, k) for k in range(cfg.seeds)]
        involved = sorted({i for d in self.drawn for p in d for i in p})
        self.data: TaskData = task_data(
            zoo, involved, device, cfg.data_examples, cfg.eval_examples, cfg.seed
        )
        sinkhorn: dict[str, Any] = {
            "steps": cfg.sinkhorn_steps,
            "trajectory_steps": trajectory_steps(cfg.sinkhorn_steps),
        }
        if not self.data.is_classifier:
            sinkhorn["loss"] = "output"  # INRs: the MSE to the interpolated fits along the path
        self.ctx = Context(
            spec=zoo.spec,
            module=zoo.module().to(device),
            solver_data=self.data.solver_data,
            aligner=model,
            options=cfg.options,
            sinkhorn=sinkhorn,
            trajectory_pairs=cfg.trajectory_pairs,
            sinkhorn_chunk=cfg.sinkhorn_chunk,
        )
        self.settings = _settings(zoo, cfg, self, aligner, bool(need), len(candidates), device)
        self.key = run_key(
            [
                {k: v for k, v in self.settings.items() if k not in ("threads", "methods")},
                zoo.plan.fingerprint,
                self.drawn,
                model_digest(model),
            ]
        )
        # this shard's pairs (all of them unsharded): whole Sinkhorn chunks, so every batched
        # run is the one an unsharded bench makes
        chunk = cfg.sinkhorn_chunk or 1
        self.positions = [
            shard_positions(len(d), chunk, part.index, part.count) for d in self.drawn
        ]
        start = self.positions[0][0] if self.positions[0] else 0
        traced = max(0, min(cfg.trajectory_pairs - start, len(self.positions[0])))
        self.ctx = dataclasses.replace(self.ctx, trajectory_pairs=traced)
        self.a = [
            zoo.load([d[p][0] for p in pos], device) if pos else {} for d, pos in self._mine()
        ]
        self.b = [
            zoo.load([d[p][1] for p in pos], device) if pos else {} for d, pos in self._mine()
        ]

    def _mine(self) -> list[tuple[list[tuple[int, int]], list[int]]]:
        return list(zip(self.drawn, self.positions, strict=True))

    def pair_seeds(self, k: int) -> list[int]:
        """The solver seeds of this shard's pairs of seed ``k`` (those of their positions)."""
        seeds = _pair_seeds(self.seed, k, len(self.drawn[k]))
        return [seeds[p] for p in self.positions[k]]

    def run(self, method: str, k: int, tell: Callable[..., None]) -> dict[str, Any]:
        """Align seed ``k``'s pairs with ``method`` and evaluate them: the record of that run."""
        a, b = self.a[k], self.b[k]
        pairs = [self.drawn[k][p] for p in self.positions[k]]
        n = len(pairs)
        if n == 0:  # a shard past the last pair: nothing to add
            empty = torch.zeros(0, self.points, dtype=torch.float64)
            return {
                "rows": [],
                "lambdas": torch.linspace(0, 1, self.points, dtype=torch.float64),
                "loss": empty,
                "accuracy": empty.clone() if self.data.is_classifier else None,
                "timing": "",
                "first_seconds": 0.0,
                "trajectories": [],
            }
        if k == 0:
            warm_up(method, a, b, self.ctx)
        run = run_method(method, a, b, self.ctx, self.pair_seeds(k), on_pair=tell)
        tell(n, "lmc")
        aligned = P.apply(self.ctx.spec, run.perm, b, batch_dims=1)
        curves = pair_curves(self.ctx.module, a, aligned, pairs, self.data, self.points)
        rows = _records(run, a, aligned, curves, pairs, k, self.ctx.spec)
        for row, pos in zip(rows, self.positions[k], strict=True):
            row["pos"] = pos
        return {
            "rows": rows,
            "lambdas": curves["lambdas"],
            "loss": curves["loss"],
            "accuracy": curves["accuracy"],
            "timing": run.timing,
            "first_seconds": run.first_seconds,
            "trajectories": run.trajectories,
        }


def _settings(
    zoo: Zoo,
    cfg: BenchConfig,
    bench: _Bench,
    aligner: Any,
    aligner_used: bool,
    available: int,
    device: torch.device,
) -> dict[str, Any]:
    """What the run was, as written in ``bench.json`` (and, less the thread count, its resume key)."""
    data = bench.data
    return {
        "zoo": str(zoo.path),
        "task": zoo.task,
        "kind": zoo.kind,
        "architecture": zoo.config,
        "aligner": None if aligner is None else _aligner_name(aligner),
        "aligner_used": aligner_used,
        "methods": bench.methods,
        "pairs_requested": cfg.pairs,
        "pairs": len(bench.drawn[0]),
        "pairs_available": available,
        "pair_kind": "two views of one target"
        if (zoo.kind != "classifier" and zoo.plan.views >= 2)
        else "two distinct test networks",
        "seeds": cfg.seeds,
        "seed": cfg.seed,
        "points": cfg.points,
        "loss": data.loss_name,
        "eval_split": "test" if data.is_classifier else "INR coordinates",
        "eval_examples": data.eval_examples,
        "data_examples": data.solver_examples,
        "data_split": "train" if data.is_classifier else "INR coordinates",
        "sinkhorn_steps": cfg.sinkhorn_steps,
        "sinkhorn_loss": "task (cross-entropy at random lam)"
        if data.is_classifier
        else "output (MSE to the interpolated end networks' outputs at random lam)",
        "sinkhorn_chunk": cfg.sinkhorn_chunk,
        "trajectory_steps": trajectory_steps(cfg.sinkhorn_steps),
        "trajectory_pairs": min(cfg.trajectory_pairs, len(bench.drawn[0])),
        "options": {m: {k: _jsonable(v) for k, v in o.items()} for m, o in cfg.options.items()},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def _error_text(exc: Exception) -> str:
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else ""
    if not isinstance(exc, DeepAlignError):
        msg = f"{type(exc).__name__}: {msg}"
    return msg[:300]


def _method_entry(
    bench: _Bench,
    method: str,
    partial: PartialRuns,
    run_no: int,
    runs_total: int,
    on_progress: ProgressFn | None,
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Every seed of one method (resumed where a killed run finished it): its entry in
    ``bench.json``, its run records, and how many of them were resumed."""
    seeds = bench.cfg.seeds
    entry: dict[str, Any] = {"method": method, "label": label(method), "status": "ok"}
    records: list[dict[str, Any]] = []
    resumed = 0
    for k in range(seeds):
        event = {"method": method, "seed": k, "run": run_no + k, "runs": runs_total}
        event["total"] = len(bench.positions[k]) + 1

        def tell(done: int, stage: str = "align", event=event) -> None:
            if on_progress is not None:
                on_progress({**event, "done": done, "stage": stage})

        tell(0)
        rec = partial.get(method, k)
        if rec is not None:
            resumed += 1
        elif bench.cfg.gather:
            raise DeepAlignError(
                f"--gather: {method} (seed {k}) is not finished by every shard; run the missing "
                "--shard jobs first"
            )
        else:
            try:
                rec = bench.run(method, k, tell)
            except Exception as exc:  # noqa: BLE001 - a failing method is reported; the run goes on
                entry.update(status="failed", error=_error_text(exc), failed_seed=k)
                tell(event["total"], "failed")
                return entry, [], resumed
            partial.put(method, k, rec)
        records.append(rec)
        tell(event["total"], "done")
    rows = [r for rec in records for r in rec["rows"]]
    entry["timing"] = records[0]["timing"]
    if records[0].get("first_seconds"):
        entry["first_stage_seconds_per_pair"] = [rec["first_seconds"] for rec in records]
    entry["summary"] = summarise(rows, seeds)
    entry["curve"] = _mean_curve(records)
    entry["pairs"] = rows
    return entry, records, resumed


def _trajectories(
    bench: _Bench,
    traced: dict[str, list[tuple[dict[str, Any], int]]],
    run_no: int,
    runs_total: int,
    on_progress: ProgressFn | None,
) -> dict[str, Any]:
    """The start plot's curves: each traced Sinkhorn chain, and Sinkhorn from the identity."""
    out: dict[str, Any] = {}

    def say(method: str, stage: str, done: int, total: int) -> None:
        if on_progress is not None:
            event = {"method": method, "seed": 0, "run": run_no, "runs": runs_total}
            on_progress({**event, "total": total, "done": done, "stage": stage})

    for method, recs in traced.items():
        say(method, "sinkhorn trajectory", 0, 1)
        curve = trajectory_curve(bench, recs)
        if curve is not None:
            out[method] = {**curve, "start": Chain.parse(method).start}
        say(method, "sinkhorn trajectory", 1, 1)
    if traced and "identity+sinkhorn" not in bench.methods:
        seeds = bench.cfg.seeds
        say("identity+sinkhorn", "sinkhorn from identity", 0, seeds)
        curve = identity_curve(
            bench,
            seeds,
            bench.pair_seeds,
            lambda done: say("identity+sinkhorn", "sinkhorn from identity", done, seeds),
        )
        if curve is not None:
            out["identity+sinkhorn"] = curve
    return out


def run_bench(
    zoo: Zoo | str | os.PathLike,
    aligner: Any,
    out: str | os.PathLike | None,
    config: BenchConfig | None = None,
    *,
    on_progress: ProgressFn | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Benchmark the methods of ``config`` (a :class:`BenchConfig`, or its fields as keywords) on
    held-out test pairs of ``zoo``; writes the outputs to ``out`` and returns ``bench.json``'s
    content.

    ``aligner``: an aligner folder or a loaded ``DeepAlign`` (may be None when no ``deepalign*``
    method runs). ``on_progress(event)`` gets dicts with ``method``, ``seed``, ``run``, ``runs``,
    ``done``, ``total`` and ``stage`` as the work advances. Every bad input is refused before any
    work. A killed run resumes from its finished (method, seed) runs (``bench.partial.pt`` in
    ``out``).
    """
    from deepalign.bench.report import write_outputs

    known = set(BenchConfig.__dataclass_fields__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise DeepAlignError(f"run_bench: unknown setting(s) {', '.join(unknown)}")
    cfg = BenchConfig(**{**(asdict(config) if config else {}), **settings})
    check_numbers(
        cfg.pairs,
        cfg.seeds,
        cfg.points,
        cfg.sinkhorn_steps,
        cfg.data_examples,
        cfg.eval_examples,
        cfg.trajectory_pairs,
        cfg.sinkhorn_chunk,
    )
    method_list = parse_methods(cfg.methods)
    cfg.options = check_options(method_list, cfg.options or {})
    out_path = check_out(out) if out is not None else None
    part = ShardSlice.parse(cfg.shard)
    if (part.count > 1 or cfg.gather) and out_path is None:
        raise DeepAlignError("--shard and --gather need --out (the folder the shards share)")
    if part.count > 1 and cfg.gather:
        raise DeepAlignError("--gather assembles the shards' runs; give it without --shard")
    z = zoo if isinstance(zoo, Zoo) else Zoo(zoo)
    bench = _Bench(z, aligner, cfg, method_list, part)
    if part.count > 1:
        return _run_shard(bench, out_path, part, on_progress)
    partial = PartialRuns(out_path, bench.key)
    if out_path is not None:
        _, shards = gather_shards(out_path, bench.key, partial)
        if cfg.gather and shards == 0:
            raise DeepAlignError(f"{out_path}: no finished shard of this bench to gather")
    runs_total = len(method_list) * cfg.seeds
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    traced: dict[str, list[tuple[dict[str, Any], int]]] = {}
    resumed = 0
    for i, method in enumerate(method_list):
        entry, records, done = _method_entry(
            bench, method, partial, i * cfg.seeds, runs_total, on_progress
        )
        resumed += done
        results[method] = entry
        if any(rec["trajectories"] for rec in records):
            traced[method] = [(rec, k) for k, rec in enumerate(records)]
    _add_gap_closed(results, cfg.seeds, cfg.seed)
    result = {
        "format": "deepalign-bench/1",
        "settings": bench.settings,
        "pair_draws": [[list(p) for p in d] for d in bench.drawn],
        "methods": results,
        "sinkhorn_init": _trajectories(bench, traced, runs_total, runs_total, on_progress),
        "resumed_runs": resumed,
        "wall_seconds": time.perf_counter() - started,
    }
    if out_path is not None:
        write_outputs(out_path, result)
        partial.finish()
    return result


def _run_shard(
    bench: _Bench, out: Path, part: ShardSlice, on_progress: ProgressFn | None
) -> dict[str, Any]:
    """Run this shard's pairs of every (method, seed) and keep them in its partial-runs file; the
    tables come from ``--gather`` (or a plain rerun on the same folder) once every shard is done."""
    partial = PartialRuns(out, bench.key, shard_file(part.index, part.count))
    runs_total = len(bench.methods) * bench.cfg.seeds
    failed = {}
    for i, method in enumerate(bench.methods):
        entry, _, _ = _method_entry(
            bench, method, partial, i * bench.cfg.seeds, runs_total, on_progress
        )
        if entry["status"] != "ok":
            failed[method] = entry["error"]
    return {
        "format": "deepalign-bench-shard/1",
        "shard": [part.index, part.count],
        "pairs": [len(p) for p in bench.positions],
        "file": str(out / shard_file(part.index, part.count)),
        "failed": failed,
    }


def _add_gap_closed(results: dict[str, dict[str, Any]], seeds: int, seed: int) -> None:
    """Each finished method's gap closed (:mod:`deepalign.bench.gap`) into its summary."""
    done = {m: e for m, e in results.items() if e["status"] == "ok"}
    barriers = {
        m: [[r["barrier"] for r in e["pairs"] if r["seed"] == k] for k in range(seeds)]
        for m, e in done.items()
    }
    gaps = gap_closed(barriers, seed)
    for m, e in done.items():
        e["summary"]["gap_closed"] = None if gaps is None else gaps[m]


def _aligner_name(aligner: Any) -> str:
    return str(aligner) if isinstance(aligner, (str, os.PathLike)) else "in-memory model"


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v)
