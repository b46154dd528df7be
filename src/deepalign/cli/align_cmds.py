"""`deepalign align`, `merge`, `lmc` and `similarity`: every method on checkpoints — ours, or the
user's plain state dicts with their class (``--model FILE.py:NAME``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import typer

from deepalign.cli.common import (
    ALIGNER,
    DATA,
    DATA_DIR,
    DEVICE,
    INPUT_SHAPE,
    METHOD,
    MODEL,
    MODEL_ARGS,
    NORMALIZE,
    OPTS,
    SEED,
    Checkpoints,
    app,
    check_method,
    check_normalize,
    claim,
    load_aligner,
    load_data,
    note,
    parse_options,
    progress,
    resolve_device,
    say,
    seed_everything,
    stage_bars,
)
from deepalign.errors import DeepAlignError


def _networks(paths: list[Path], device: str, model, model_args, input_shape) -> Checkpoints:
    return Checkpoints(list(paths), resolve_device(device), model, model_args, input_shape)


def solve(
    nets: Checkpoints,
    chain: Any,
    data: Any,
    seed: int,
    options: dict[str, Any],
    aligner: Any,
    a: dict | None = None,
    b: dict | None = None,
    bars: bool = True,
) -> tuple[dict, dict[str, Any]]:
    """Run the method on A and B (or on the given states of their architecture), with a
    progress bar for every stage that reports its steps."""
    from deepalign.solvers import align

    def run(tell: Any) -> tuple[dict, dict[str, Any]]:
        return align(
            nets.a if a is None else a,
            nets.b if b is None else b,
            nets.spec,
            chain,
            module=nets.module,
            data=data,
            seed=seed,
            aligner=aligner,
            progress=tell,
            **options,
        )

    if not bars:
        return run(None)
    with stage_bars() as tell:
        return run(tell)


def _jsonable(curve: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in curve.items()}


def _summary(info: dict[str, Any]) -> str:
    return (
        f"method {info['method']}: weight distance {info['l2_before']:.4g} -> {info['l2']:.4g}, "
        f"objective {info['objective_before']:.6g} -> {info['objective']:.6g}, "
        f"{info['iterations']} iterations, {info['seconds']:.3g} s"
    )


def _warn_chance(curve: dict[str, Any], data: Any, label: str) -> None:
    """A note when an end point scores near chance: the data's preprocessing may not match."""
    acc = curve.get("accuracy")
    labels = data.y if hasattr(data, "y") else data[1]
    n_classes = getattr(data, "n_classes", None) or int(labels.max()) + 1
    if acc is None or n_classes < 2:
        return
    chance = 1.0 / n_classes
    ends = {"A (lambda 0)": float(acc[0]), "B (lambda 1)": float(acc[-1])}
    low = [f"{k} {v:.1%}" for k, v in ends.items() if v < 1.5 * chance]
    if low:
        note(
            f"{', '.join(low)} accuracy on {label}, near chance ({chance:.0%}): does the data's "
            "preprocessing match the model's? (--normalize none keeps pixels in [0, 1]; "
            "--data FILE.npz uses your own)"
        )


@app.command()
def align(
    a: Path = typer.Argument(..., help="Reference checkpoint A."),
    b: Path = typer.Argument(..., help="Checkpoint B, to be permuted into A's basis."),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Where to write aligned B (.pt: a plain torch state dict; else safetensors).",
    ),
    method: str = METHOD,
    perm_out: Path | None = typer.Option(
        None, "--perm-out", help="Also write the permutation (JSON)."
    ),
    data: str | None = DATA,
    data_dir: Path | None = DATA_DIR,
    normalize: str = NORMALIZE,
    opt: list[str] = OPTS,
    aligner: Path | None = ALIGNER,
    model: str | None = MODEL,
    model_args: str | None = MODEL_ARGS,
    input_shape: str | None = INPUT_SHAPE,
    seed: int = SEED,
    device: str = DEVICE,
) -> None:
    """Permute B's neurons into A's basis; the output computes exactly B's function, with B's
    parameter names.

    Example: deepalign align a.safetensors b.safetensors --method wm --out b_aligned.safetensors

    Example: deepalign align a.pt b.pt --model my_model.py:MyMLP --out b_aligned.pt
    """
    from deepalign.core import permutation as P

    options = parse_options(opt)
    chain = check_method(method, data, aligner, options)
    check_normalize(normalize)
    seed_everything(seed)
    with claim(out, perm_out) as (tmp_out, tmp_perm):
        nets = _networks([a, b], device, model, model_args, input_shape)
        ds = load_data(data, "train", data_dir, nets, normalize) if data else None
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
        nets.write(aligned, tmp_out, out, meta)
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
    out: Path = typer.Option(
        ..., "--out", help="Where to write the merge (.pt: a plain torch state dict)."
    ),
    method: str = METHOD,
    alpha: float | None = typer.Option(
        None, "--alpha", help="Two checkpoints: weight of aligned B, (1-alpha)*A + alpha*B [0.5]."
    ),
    passes: int = typer.Option(
        10, "--passes", help="Three or more: at most this many passes over the networks."
    ),
    data: str | None = DATA,
    data_dir: Path | None = DATA_DIR,
    normalize: str = NORMALIZE,
    bn_reset: bool = typer.Option(
        False, "--bn-reset", help="Recompute BatchNorm statistics of the merge on --data (train)."
    ),
    bn_examples: int = typer.Option(
        5000, "--bn-examples", help="Training examples for --bn-reset."
    ),
    opt: list[str] = OPTS,
    aligner: Path | None = ALIGNER,
    model: str | None = MODEL,
    model_args: str | None = MODEL_ARGS,
    input_shape: str | None = INPUT_SHAPE,
    seed: int = SEED,
    device: str = DEVICE,
) -> None:
    """Align, then average: (1 - alpha) * A + alpha * aligned B, or the mean of N aligned networks.

    Example: deepalign merge a.safetensors b.safetensors --method wm --alpha 0.5 --out merged.safetensors

    Example: deepalign merge m1.safetensors m2.safetensors m3.safetensors --method wm --out merged.safetensors

    Example: deepalign merge a.pt b.pt --model my_model.py:MyNet --input-shape 1,28,28 --data mine.npz --bn-reset --out merged.pt
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
        raise DeepAlignError("--bn-reset needs training data: pass --data NAME or --data FILE")
    options = parse_options(opt)
    chain = check_method(method, data, aligner, options)
    check_normalize(normalize)
    seed_everything(seed)
    from deepalign.core import permutation as P
    from deepalign.lmc import interpolate, reset_bn_stats
    from deepalign.solvers.merge_many import merge_many

    with claim(out) as (tmp_out,):
        nets = _networks(list(checkpoints), device, model, model_args, input_shape)
        ds = load_data(data, "train", data_dir, nets, normalize) if data else None
        aligned_by = load_aligner(chain, aligner, nets)
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
                    aligner=aligned_by,
                    **options,
                )
                bar.update(task, total=bar.tasks[task].completed)
            meta["passes"] = info["passes"]
        else:
            perm, info = solve(nets, chain, ds, seed, options, aligned_by)
            merged = interpolate(nets.a, P.apply(nets.spec, perm, nets.b), alpha)
            meta["alpha"] = alpha
        if bn_reset and data is not None:
            net = nets.module
            net.load_state_dict(merged)
            reset = load_data(data, "train", data_dir, nets, normalize, bn_examples, seed)
            reset_bn_stats(net, reset)
            merged = {k: v.detach().clone() for k, v in net.state_dict().items()}
        nets.write(merged, tmp_out, out, meta)
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
    data: str = typer.Option(
        ...,
        "--data",
        help="Data to evaluate on: a built-in set (its test split; methods that use data read its "
        "train split) or your FILE.npz / FILE.pt with x and y (used for both, as given).",
    ),
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
    normalize: str = NORMALIZE,
    opt: list[str] = OPTS,
    aligner: Path | None = ALIGNER,
    model: str | None = MODEL,
    model_args: str | None = MODEL_ARGS,
    input_shape: str | None = INPUT_SHAPE,
    seed: int = SEED,
    device: str = DEVICE,
) -> None:
    """Loss and accuracy along (1 - lambda) * A + lambda * aligned B; barrier and AUC, next to naive.

    Methods that use data (am, sinkhorn's task loss) read the training split; curves use the test split.

    Example: deepalign lmc a.safetensors b.safetensors --method wm --data digits --json lmc.json --plot lmc.png

    Example: deepalign lmc a.pt b.pt --model my_model.py:MyMLP --data test.npz --method am
    """
    if points < 2:
        raise DeepAlignError(f"--points {points}: need at least 2")
    options = parse_options(opt)
    chain = check_method(method, data, aligner, options)
    check_normalize(normalize)
    seed_everything(seed)
    from deepalign.core import permutation as P
    from deepalign.lmc import has_batchnorm, lmc_curve

    with claim(json_out, plot) as (tmp_json, tmp_plot):
        nets = _networks([a, b], device, model, model_args, input_shape)
        test = load_data(data, "test", data_dir, nets, normalize)
        train = load_data(data, "train", data_dir, nets, normalize) if chain.uses_data else None
        reset = (
            load_data(data, "train", data_dir, nets, normalize, bn_examples, seed)
            if bn_reset
            else None
        )
        if has_batchnorm(nets.module) and not bn_reset:
            note("the model has BatchNorm; --bn-reset recomputes its statistics at each lambda")
        perm, info = solve(nets, chain, train, seed, options, load_aligner(chain, aligner, nets))
        aligned_b = P.apply(nets.spec, perm, nets.b)
        t0 = time.perf_counter()
        kw: dict[str, Any] = {"bn_reset": reset, "batch_size": batch_size}
        with progress() as bar:
            curves = {}
            for label, other in ((method, aligned_b), ("naive", nets.b)):
                task = bar.add_task(f"lmc {label}", total=points)
                curves[label] = lmc_curve(
                    nets.module,
                    nets.a,
                    other,
                    test,
                    points,
                    on_point=lambda done, total, task=task: bar.update(task, completed=done),
                    **kw,
                )
        curve, naive = curves[method], curves["naive"]
        _warn_chance(curve, test, data)
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


def _agreement(module: Any, a: dict, b: dict, data: Any) -> float:
    """Share of examples on which two weight sets of ``module`` predict the same class."""
    import copy

    import torch

    from deepalign.data import labelled_batches

    net_a, net_b = copy.deepcopy(module).eval(), copy.deepcopy(module).eval()
    net_a.load_state_dict(a)
    net_b.load_state_dict(b)
    same = total = 0
    with torch.no_grad():
        for x, _ in labelled_batches(data, 512):
            same += int((net_a(x).argmax(-1) == net_b(x).argmax(-1)).sum())
            total += x.shape[0]
    return same / max(total, 1)


@app.command()
def similarity(
    checkpoints: list[Path] = typer.Argument(
        ..., help="Two or more checkpoints of one architecture."
    ),
    method: str = METHOD,
    json_out: Path | None = typer.Option(None, "--json", help="Write the table as JSON."),
    data: str | None = DATA,
    data_dir: Path | None = DATA_DIR,
    normalize: str = NORMALIZE,
    opt: list[str] = OPTS,
    aligner: Path | None = ALIGNER,
    model: str | None = MODEL,
    model_args: str | None = MODEL_ARGS,
    input_shape: str | None = INPUT_SHAPE,
    seed: int = SEED,
    device: str = DEVICE,
) -> None:
    """How alike every pair of networks is, blind to neuron order: the weight distance after
    alignment (and before), relative to the networks' size, and — with --data — how often the two
    predict the same class.

    Example: deepalign similarity m1.safetensors m2.safetensors m3.safetensors --method wm --json sim.json
    """
    if len(checkpoints) < 2:
        raise DeepAlignError("similarity needs at least two checkpoints")
    options = parse_options(opt)
    chain = check_method(method, data, aligner, options)
    check_normalize(normalize)
    seed_everything(seed)
    from deepalign.solvers.objective import weight_inner

    rows = []
    with claim(json_out) as (tmp_json,):
        nets = _networks(list(checkpoints), device, model, model_args, input_shape)
        states = nets.states
        ds = load_data(data, "train", data_dir, nets, normalize) if data else None
        test = load_data(data, "test", data_dir, nets, normalize) if data else None
        aligned_by = load_aligner(chain, aligner, nets)
        norms = [math.sqrt(max(weight_inner(s, s, nets.spec), 0.0)) for s in states]
        jobs = [(i, j) for i in range(len(states)) for j in range(i + 1, len(states))]
        with progress() as bar:
            task = bar.add_task("aligning pairs", total=len(jobs))
            for i, j in jobs:
                perm, info = solve(
                    nets, chain, ds, seed, options, aligned_by, states[i], states[j], bars=False
                )
                scale = math.sqrt(norms[i] * norms[j]) or 1.0
                row = {
                    "a": i,
                    "b": j,
                    "l2": info["l2"],
                    "relative": info["l2"] / scale,
                    "l2_before": info["l2_before"],
                    "relative_before": info["l2_before"] / scale,
                }
                if test is not None:
                    from deepalign.core import permutation as P

                    aligned = P.apply(nets.spec, perm, states[j])
                    row["agreement"] = _agreement(nets.module, states[i], aligned, test)
                rows.append(row)
                bar.advance(task)
        if tmp_json is not None:
            n = len(states)

            def matrix(key: str) -> list[list[float]]:
                m = [[0.0 if key != "agreement" else 1.0] * n for _ in range(n)]
                for r in rows:
                    m[r["a"]][r["b"]] = m[r["b"]][r["a"]] = r[key]
                return m

            keys = ["l2", "l2_before", "relative", "relative_before"]
            keys += ["agreement"] if test is not None else []
            names = {"l2": "after", "l2_before": "before", "relative": "relative_after"}
            result = {
                "files": [str(p) for p in checkpoints],
                "method": method,
                "metric": "L2 distance of the permuted weights (BatchNorm running statistics "
                "excluded); relative = L2 / sqrt(|A| |B|); agreement = share of test examples "
                "with the same predicted class",
                **{names.get(k, k): matrix(k) for k in keys},
                "pairs": rows,
            }
            tmp_json.write_text(json.dumps(result, indent=1))
    names = [c.name for c in checkpoints]
    width = max(8, *(len(n) for n in names))
    head = f"{'A':<{width}} {'B':<{width}} {'L2 after':>10} {'relative':>9} {'L2 before':>10} {'relative':>9}"
    if data:
        head += f" {'same prediction':>16}"
    say(f"method {method}; relative = L2 / sqrt(|A| |B|)")
    say(head)
    for r in rows:
        line = (
            f"{names[r['a']]:<{width}} {names[r['b']]:<{width}} {r['l2']:10.4g} "
            f"{r['relative']:9.3f} {r['l2_before']:10.4g} {r['relative_before']:9.3f}"
        )
        if "agreement" in r:
            line += f" {r['agreement']:16.1%}"
        say(line)
    if json_out is not None:
        say(f"wrote {json_out}")
