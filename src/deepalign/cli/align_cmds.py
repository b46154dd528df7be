"""`deepalign align`, `merge`, `lmc` and `similarity`: every method on checkpoints."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import typer

from deepalign.cli.common import (
    ALIGNER,
    DATA,
    DATA_DIR,
    DEVICE,
    METHOD,
    OPTS,
    SEED,
    Checkpoints,
    app,
    check_method,
    claim,
    err_console,
    load_aligner,
    load_data,
    parse_options,
    progress,
    resolve_device,
    say,
    seed_everything,
    track,
)
from deepalign.core import permutation as P
from deepalign.core.checkpoint import save_state
from deepalign.core.spec import StateDict
from deepalign.errors import DeepAlignError


def solve(
    nets: Checkpoints,
    chain: Any,
    data: Any,
    seed: int,
    options: dict[str, Any],
    aligner: Any,
    a: StateDict | None = None,
    b: StateDict | None = None,
) -> tuple[P.Permutation, dict[str, Any]]:
    """Run the method on A and B (or on the given states of their architecture)."""
    from deepalign.solvers import align

    return align(
        nets.a if a is None else a,
        nets.b if b is None else b,
        nets.spec,
        chain,
        module=nets.module,
        data=data,
        seed=seed,
        aligner=aligner,
        **options,
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
    chain = check_method(method, data, aligner, options)
    seed_everything(seed)
    with claim(out, perm_out) as (tmp_out, tmp_perm):
        nets = Checkpoints([a, b], resolve_device(device))
        ds = load_data(data, "train", data_dir, nets) if data else None
        perm, info = solve(nets, chain, ds, seed, options, load_aligner(chain, aligner, nets))
        aligned = P.apply(nets.spec, perm, nets.b)
        meta = {
            "aligned_to": str(a),
            "aligned_from": str(b),
            "method": method,
            "seed": seed,
            "objective": info["objective"],
            "l2": info["l2"],
        }
        save_state(aligned, tmp_out, nets.config, meta)
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
    chain = check_method(method, data, aligner, options)
    seed_everything(seed)
    from deepalign.lmc import interpolate, reset_bn_stats
    from deepalign.solvers.merge_many import merge_many

    with claim(out) as (tmp_out,):
        nets = Checkpoints(list(checkpoints), resolve_device(device))
        ds = load_data(data, "train", data_dir, nets) if data else None
        model = load_aligner(chain, aligner, nets)
        meta: dict[str, Any] = {
            "merged_from": [str(c) for c in checkpoints],
            "method": method,
            "seed": seed,
        }
        if many:
            with progress() as bar:
                task = bar.add_task("aligning", total=(passes + 1) * len(checkpoints) - 1)
                merged, _, info = merge_many(
                    nets.states,
                    nets.spec,
                    chain,
                    module=nets.module,
                    data=ds,
                    seed=seed,
                    max_passes=passes,
                    on_step=lambda done, total: bar.update(task, completed=done),
                    aligner=model,
                    **options,
                )
                bar.update(task, total=bar.tasks[task].completed)
            meta["passes"] = info["passes"]
        else:
            perm, info = solve(nets, chain, ds, seed, options, model)
            merged = interpolate(nets.a, P.apply(nets.spec, perm, nets.b), alpha)
            meta["alpha"] = alpha
        if bn_reset and data is not None:
            net = nets.module
            net.load_state_dict(merged)
            reset_bn_stats(net, load_data(data, "train", data_dir, nets, bn_examples, seed))
            merged = {k: v.detach().clone() for k, v in net.state_dict().items()}
        save_state(merged, tmp_out, nets.config, meta)
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
    chain = check_method(method, data, aligner, options)
    seed_everything(seed)
    from deepalign.lmc import has_batchnorm, lmc_curve

    with claim(json_out, plot) as (tmp_json, tmp_plot):
        nets = Checkpoints([a, b], resolve_device(device))
        test = load_data(data, "test", data_dir, nets)
        train = load_data(data, "train", data_dir, nets) if chain.uses_data else None
        reset = load_data(data, "train", data_dir, nets, bn_examples, seed) if bn_reset else None
        if has_batchnorm(nets.module) and not bn_reset:
            err_console.print(
                "note: the model has BatchNorm; --bn-reset recomputes its statistics at each lambda",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        perm, info = solve(nets, chain, train, seed, options, load_aligner(chain, aligner, nets))
        aligned_b = P.apply(nets.spec, perm, nets.b)
        t0 = time.perf_counter()
        kw: dict[str, Any] = {"bn_reset": reset, "batch_size": batch_size}
        curve = lmc_curve(nets.module, nets.a, aligned_b, test, points, **kw)
        naive = lmc_curve(nets.module, nets.a, nets.b, test, points, **kw)
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
    chain = check_method(method, data, aligner, options)
    seed_everything(seed)
    with claim(json_out) as (tmp_json,):
        nets = Checkpoints(list(checkpoints), resolve_device(device))
        states = nets.states
        ds = load_data(data, "train", data_dir, nets) if data else None
        model = load_aligner(chain, aligner, nets)
        n = len(states)
        before = [[0.0] * n for _ in range(n)]
        after = [[0.0] * n for _ in range(n)]
        jobs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        for i, j in track(jobs, "aligning pairs"):
            _, info = solve(nets, chain, ds, seed, options, model, a=states[i], b=states[j])
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
