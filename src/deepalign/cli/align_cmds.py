"""`deepalign align`, `merge`, `lmc` and `similarity`: the classic solvers on checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import typer
from torch import nn

from deepalign.cli.common import (
    DEVICE,
    SEED,
    app,
    console,
    err_console,
    progress,
    resolve_device,
    seed_everything,
    track,
)
from deepalign.cli.core_cmds import load_checkpoint
from deepalign.core import permutation as P
from deepalign.core.checkpoint import save_state
from deepalign.core.io import atomic_path
from deepalign.core.spec import PermutationSpec, StateDict
from deepalign.errors import DeepAlignError

METHOD = typer.Option(
    "wm",
    "--method",
    "-m",
    help="identity, wm, am (needs --data), sinkhorn, deepalign (needs --aligner), or a chain "
    "such as wm+sinkhorn (the first answer starts the second).",
)
DATA = typer.Option(
    None,
    "--data",
    help="Data set for methods that use data: digits, fashion-mnist, mnist, cifar10.",
)
DATA_DIR = typer.Option(None, "--data-dir", help="Folder holding the data set's files.")
OPTS = typer.Option(
    [], "--opt", "-o", help="Method option KEY=VALUE, repeatable (e.g. -o steps=500 -o lr=0.05)."
)
ALIGNER = typer.Option(None, "--aligner", help="Trained Deep-Align folder (methods deepalign*).")


class Pair:
    """Checkpoints of one architecture on one device: ``states[0]`` is A, ``states[1]`` is B."""

    def __init__(self, paths: list[Path], device: torch.device) -> None:
        state, config, module, spec, _ = load_checkpoint(paths[0])
        self.states = [{k: v.to(device) for k, v in state.items()}]
        for p in paths[1:]:
            other, other_config, _, _, _ = load_checkpoint(p)
            if other_config != config:
                raise DeepAlignError(
                    f"{paths[0]} and {p} have different architectures; both must be the same"
                )
            self.states.append({k: v.to(device) for k, v in other.items()})
        self.paths = list(paths)
        self.config: dict = config
        self.module: nn.Module = module.to(device)
        self.spec: PermutationSpec = spec
        self.device = device

    @property
    def a(self) -> StateDict:
        return self.states[0]

    @property
    def b(self) -> StateDict:
        return self.states[1]


@contextlib.contextmanager
def claim(*paths: Path | None) -> Iterator[list[Path | None]]:
    """Temporary files for every output, claimed before any work: all are written or none."""
    with contextlib.ExitStack() as stack:
        yield [None if p is None else stack.enter_context(atomic_path(p)) for p in paths]


def say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values are JSON when they parse, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DeepAlignError(f"--opt {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def fit_data(ds: Any, pair: Pair) -> Any:
    """``ds`` as the model reads it: images as they are, or flattened for MLPs without Flatten."""
    ds = ds.to(pair.device)
    for candidate in (ds, (ds.x.flatten(1), ds.y)):
        x = candidate.x if candidate is ds else candidate[0]
        try:
            with torch.no_grad():
                pair.module(x[:2])
            return candidate
        except RuntimeError:
            continue
    raise DeepAlignError(
        f"data set {ds.name} (images {tuple(ds.x.shape[1:])}) does not fit the model in {pair.paths[0]}"
    )


def load_data(
    name: str,
    split: str,
    data_dir: Path | None,
    pair: Pair,
    examples: int | None = None,
    seed: int = 0,
) -> Any:
    """Split ``split`` of data set ``name`` (a seeded subset of ``examples`` when given), fitted."""
    from deepalign.data import load

    ds = load(name, split=split, data_dir=data_dir)
    if examples is not None and examples < len(ds):
        ds = ds.subset(examples, seed=seed)
    return fit_data(ds, pair)


def check_method(method: str, data: str | None, aligner: Path | None) -> None:
    """Fail early (before any work or file) on an unknown method or missing data."""
    from deepalign.solvers.registry import needs_data, resolve

    if any(p.strip().startswith("deepalign") for p in method.split("+")) and aligner is None:
        raise DeepAlignError(f"method {method!r} needs a trained aligner (--aligner DIR)")
    resolve(method)
    if data is None and needs_data(method):
        raise DeepAlignError(f"method {method!r} needs data: pass --data NAME (e.g. --data digits)")


def with_aligner(method: str, options: dict[str, Any], aligner: Path | None) -> dict[str, Any]:
    """The solver options plus ``--aligner`` when a part of ``method`` is a Deep-Align method."""
    if aligner is not None and any(p.strip().startswith("deepalign") for p in method.split("+")):
        return {**options, "aligner": str(aligner)}
    return dict(options)


def solve(
    pair: Pair,
    method: str,
    data: Any,
    seed: int,
    options: dict[str, Any],
    aligner: Path | None = None,
    a: StateDict | None = None,
    b: StateDict | None = None,
) -> tuple[P.Permutation, dict[str, Any]]:
    """Run the method on the pair (or on the given states of its architecture)."""
    from deepalign.solvers.registry import align

    opts = with_aligner(method, options, aligner)
    return align(
        pair.a if a is None else a,
        pair.b if b is None else b,
        pair.spec,
        method,
        module=pair.module,
        data=data,
        seed=seed,
        **opts,
    )


def _jsonable(curve: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in curve.items()}


def _summary(info: dict[str, Any]) -> str:
    return (
        f"method {info['method']}: weight distance {info['l2_before']:.4g} -> {info['l2']:.4g}, "
        f"objective {info['objective_before']:.6g} -> {info['objective']:.6g}, "
        f"{info['iterations']} iterations, {info['seconds']:.3g} s"
    )


@app.command()
def align(
    a: Path = typer.Argument(..., help="Reference checkpoint A."),
    b: Path = typer.Argument(..., help="Checkpoint B, to be permuted into A's basis."),
    out: Path = typer.Option(..., "--out", help="Where to write aligned B."),
    method: str = METHOD,
    perm_out: Path | None = typer.Option(
        None, "--perm-out", help="Also write the permutation (JSON)."
    ),
    data: str | None = DATA,
    data_dir: Path | None = DATA_DIR,
    opt: list[str] = OPTS,
    aligner: Path | None = ALIGNER,
    seed: int = SEED,
    device: str = DEVICE,
) -> None:
    """Permute B's neurons into A's basis; the output computes exactly B's function.

    Example: deepalign align a.safetensors b.safetensors --method wm --out b_aligned.safetensors
    """
    options = parse_options(opt)
    check_method(method, data, aligner)
    seed_everything(seed)
    with claim(out, perm_out) as (tmp_out, tmp_perm):
        pair = Pair([a, b], resolve_device(device))
        ds = load_data(data, "train", data_dir, pair) if data else None
        perm, info = solve(pair, method, ds, seed, options, aligner)
        aligned = P.apply(pair.spec, perm, pair.b)
        meta = {
            "aligned_to": str(a),
            "aligned_from": str(b),
            "method": method,
            "seed": seed,
            "objective": info["objective"],
            "l2": info["l2"],
        }
        save_state(aligned, tmp_out, pair.config, meta)
        if tmp_perm is not None:
            P.save_json(perm, tmp_perm)
    say(f"wrote {out}" + (f" and {perm_out}" if perm_out else ""))
    say(_summary(info))


@app.command()
def merge(
    checkpoints: list[Path] = typer.Argument(
        ...,
        help="Checkpoints of one architecture: A and B (B aligned to A, then averaged), or three "
        "or more (all aligned into the first one's basis, then averaged: MergeMany).",
    ),
    out: Path = typer.Option(..., "--out", help="Where to write the merged checkpoint."),
    method: str = METHOD,
    alpha: float | None = typer.Option(
        None, "--alpha", help="Two checkpoints: weight of aligned B, (1-alpha)*A + alpha*B [0.5]."
    ),
    passes: int = typer.Option(
        10, "--passes", help="Three or more: at most this many passes over the networks."
    ),
    data: str | None = DATA,
    data_dir: Path | None = DATA_DIR,
    bn_reset: bool = typer.Option(
        False, "--bn-reset", help="Recompute BatchNorm statistics of the merge on --data (train)."
    ),
    bn_examples: int = typer.Option(
        5000, "--bn-examples", help="Training examples for --bn-reset."
    ),
    opt: list[str] = OPTS,
    aligner: Path | None = ALIGNER,
    seed: int = SEED,
    device: str = DEVICE,
) -> None:
    """Align, then average: (1 - alpha) * A + alpha * aligned B, or the mean of N aligned networks.

    Example: deepalign merge a.safetensors b.safetensors --method wm --alpha 0.5 --out merged.safetensors

    Example: deepalign merge m1.safetensors m2.safetensors m3.safetensors --method wm --out merged.safetensors
    """
    if len(checkpoints) < 2:
        raise DeepAlignError("merge needs at least two checkpoints")
    many = len(checkpoints) > 2
    if many and alpha is not None:
        raise DeepAlignError("--alpha applies to two checkpoints; three or more are averaged")
    alpha = 0.5 if alpha is None else alpha
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise DeepAlignError(f"--alpha {alpha}: must lie in [0, 1]")
    if passes < 1:
        raise DeepAlignError(f"--passes {passes}: must be at least 1")
    if bn_reset and data is None:
        raise DeepAlignError("--bn-reset needs training data: pass --data NAME")
    options = parse_options(opt)
    check_method(method, data, aligner)
    seed_everything(seed)
    from deepalign.lmc import interpolate, reset_bn_stats
    from deepalign.lmc.merge_many import merge_many
    from deepalign.solvers.registry import check_options

    with claim(out) as (tmp_out,):
        pair = Pair(list(checkpoints), resolve_device(device))
        ds = load_data(data, "train", data_dir, pair) if data else None
        meta: dict[str, Any] = {
            "merged_from": [str(c) for c in checkpoints],
            "method": method,
            "seed": seed,
        }
        if many:
            options = with_aligner(method, options, aligner)
            check_options(method, options)  # before the progress bar
            with progress() as bar:
                task = bar.add_task("aligning", total=(passes + 1) * len(checkpoints) - 1)
                merged, _, info = merge_many(
                    pair.states,
                    pair.spec,
                    method,
                    module=pair.module,
                    data=ds,
                    seed=seed,
                    max_passes=passes,
                    on_step=lambda done, total: bar.update(task, completed=done),
                    **options,
                )
                bar.update(task, total=bar.tasks[task].completed)
            meta["passes"] = info["passes"]
        else:
            perm, info = solve(pair, method, ds, seed, options, aligner)
            merged = interpolate(pair.a, P.apply(pair.spec, perm, pair.b), alpha)
            meta["alpha"] = alpha
        if bn_reset and data is not None:
            net = pair.module
            net.load_state_dict(merged)
            reset_bn_stats(net, load_data(data, "train", data_dir, pair, bn_examples, seed))
            merged = {k: v.detach().clone() for k, v in net.state_dict().items()}
        save_state(merged, tmp_out, pair.config, meta)
    if many:
        last = info["history"][-1]
        state = "converged" if info["converged"] else "stopped at --passes"
        say(f"wrote {out}  (mean of {len(checkpoints)} networks in {checkpoints[0].name}'s basis)")
        say(
            f"method {method}: {info['passes']} pass(es), {state}; "
            f"pairwise objective {last['objective']:.6g}"
        )
    else:
        say(f"wrote {out}  (alpha {alpha} of aligned B)")
        say(_summary(info))


@app.command()
def lmc(
    a: Path = typer.Argument(..., help="Checkpoint A (lambda = 0)."),
    b: Path = typer.Argument(..., help="Checkpoint B (lambda = 1 after alignment)."),
    data: str = typer.Option(..., "--data", help="Data set to evaluate on (its test split)."),
    method: str = METHOD,
    points: int = typer.Option(25, "--points", help="Number of lambdas in [0, 1], ends included."),
    json_out: Path | None = typer.Option(None, "--json", help="Write curves and metrics as JSON."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a PNG of the aligned and naive curves."
    ),
    bn_reset: bool = typer.Option(
        False, "--bn-reset", help="Recompute BatchNorm statistics at every lambda (training data)."
    ),
    bn_examples: int = typer.Option(
        5000, "--bn-examples", help="Training examples for --bn-reset."
    ),
    batch_size: int = typer.Option(512, "--batch-size", help="Evaluation batch size."),
    data_dir: Path | None = DATA_DIR,
    opt: list[str] = OPTS,
    aligner: Path | None = ALIGNER,
    seed: int = SEED,
    device: str = DEVICE,
) -> None:
    """Loss and accuracy along (1 - lambda) * A + lambda * aligned B; barrier and AUC, next to naive.

    Methods that use data (am, sinkhorn's task loss) read the training split; curves use the test split.

    Example: deepalign lmc a.safetensors b.safetensors --method wm --data digits --json lmc.json --plot lmc.png
    """
    if points < 2:
        raise DeepAlignError(f"--points {points}: need at least 2")
    options = parse_options(opt)
    check_method(method, data, aligner)
    seed_everything(seed)
    from deepalign.lmc import has_batchnorm, lmc_curve
    from deepalign.solvers.registry import uses_data

    with claim(json_out, plot) as (tmp_json, tmp_plot):
        pair = Pair([a, b], resolve_device(device))
        test = load_data(data, "test", data_dir, pair)
        train = load_data(data, "train", data_dir, pair) if uses_data(method) else None
        reset = load_data(data, "train", data_dir, pair, bn_examples, seed) if bn_reset else None
        if has_batchnorm(pair.module) and not bn_reset:
            err_console.print(
                "note: the model has BatchNorm; --bn-reset recomputes its statistics at each lambda",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        perm, info = solve(pair, method, train, seed, options, aligner)
        aligned_b = P.apply(pair.spec, perm, pair.b)
        t0 = time.perf_counter()
        kw: dict[str, Any] = {"bn_reset": reset, "batch_size": batch_size}
        curve = lmc_curve(pair.module, pair.a, aligned_b, test, points, **kw)
        naive = lmc_curve(pair.module, pair.a, pair.b, test, points, **kw)
        result = {
            "a": str(a),
            "b": str(b),
            "method": method,
            "data": data,
            "split": "test",
            "points": points,
            "seed": seed,
            "bn_reset": bn_reset,
            **_jsonable(curve),
            "seconds": info["seconds"],
            "eval_seconds": time.perf_counter() - t0,
            "objective": info["objective"],
            "l2": info["l2"],
            "l2_before": info["l2_before"],
            "naive": _jsonable(naive),
        }
        if tmp_json is not None:
            tmp_json.write_text(json.dumps(result, indent=1))
        if tmp_plot is not None and plot is not None:
            from deepalign.lmc.plot import plot_curves

            title = f"{a.name} vs {b.name} on {data} (test)"
            fmt = plot.suffix.lstrip(".").lower() or "png"
            plot_curves(tmp_plot, {method: curve, "naive": naive}, title=title, fmt=fmt)
    say(f"{'':12} {'barrier':>9} {'AUC':>9} {'acc. barrier':>13} {'loss(0.5)':>10}")
    mid = (points - 1) // 2
    for label, c in ((method, curve), ("naive", naive)):
        say(
            f"{label:12} {c['barrier']:9.4f} {c['auc']:9.4f} {c['accuracy_barrier']:13.4f} "
            f"{float(c['loss'][mid]):10.4f}"
        )
    wrote = [str(p) for p in (json_out, plot) if p is not None]
    say(f"alignment {info['seconds']:.3g} s" + (f"; wrote {', '.join(wrote)}" if wrote else ""))


@app.command()
def similarity(
    checkpoints: list[Path] = typer.Argument(
        ..., help="Two or more checkpoints of one architecture."
    ),
    method: str = METHOD,
    json_out: Path | None = typer.Option(None, "--json", help="Write both matrices as JSON."),
    data: str | None = DATA,
    data_dir: Path | None = DATA_DIR,
    opt: list[str] = OPTS,
    aligner: Path | None = ALIGNER,
    seed: int = SEED,
    device: str = DEVICE,
) -> None:
    """Weight distance between every pair after alignment (blind to neuron order), and before.

    Example: deepalign similarity m1.safetensors m2.safetensors m3.safetensors --method wm --json sim.json
    """
    if len(checkpoints) < 2:
        raise DeepAlignError("similarity needs at least two checkpoints")
    options = parse_options(opt)
    check_method(method, data, aligner)
    seed_everything(seed)
    with claim(json_out) as (tmp_json,):
        pair = Pair(list(checkpoints), resolve_device(device))
        states = pair.states
        ds = load_data(data, "train", data_dir, pair) if data else None
        n = len(states)
        before = [[0.0] * n for _ in range(n)]
        after = [[0.0] * n for _ in range(n)]
        jobs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        for i, j in track(jobs, "aligning pairs"):
            _, info = solve(pair, method, ds, seed, options, aligner, a=states[i], b=states[j])
            before[i][j] = before[j][i] = info["l2_before"]
            after[i][j] = after[j][i] = info["l2"]
        if tmp_json is not None:
            result = {
                "files": [str(p) for p in checkpoints],
                "method": method,
                "metric": "l2 weight distance (BatchNorm running statistics excluded)",
                "after": after,
                "before": before,
            }
            tmp_json.write_text(json.dumps(result, indent=1))
    for title, mat in (
        (f"weight distance after alignment ({method})", after),
        ("before alignment", before),
    ):
        say(title)
        for i, row in enumerate(mat):
            say(f"  {i:>3} " + " ".join(f"{v:10.4g}" for v in row) + f"   {checkpoints[i].name}")
    if json_out is not None:
        say(f"wrote {json_out}")
