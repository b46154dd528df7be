"""`deepalign zoo`, `deepalign export`, and `inspect` on a zoo folder."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from deepalign.cli.common import DEVICE, SEED, app, console, err_console, resolve_device
from deepalign.errors import DeepAlignError
from deepalign.zoo.tasks import DEFAULT_TASK, TASKS

TASK_HELP = "Zoo task: " + "; ".join(f"{name} = {t.help}" for name, t in TASKS.items())


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:  # type: ignore[override]
        speed = task.finished_speed or task.speed
        return Text("-- models/s" if speed is None else f"{speed:.1f} models/s")


def _out(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _parse_hidden(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        widths = [int(p) for p in text.replace("-", ",").split(",") if p.strip()]
    except ValueError:
        raise DeepAlignError(f"--hidden {text!r}: expected widths like 32,32,32") from None
    if not widths:
        raise DeepAlignError(f"--hidden {text!r}: expected widths like 32,32,32")
    return widths


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and metric distributions of a zoo's trained models."""
    done = [r for r in rows if r.get("trained")]
    out: dict[str, Any] = {"models": len(rows), "trained": len(done)}
    out["diverged"] = sum(not r.get("finite", True) for r in done)
    ok = [r for r in done if r.get("finite", True)]
    out["splits"] = {s: sum(r["split"] == s for r in ok) for s in ("train", "val", "test")}
    for key in ("test_accuracy", "test_loss"):
        vals = [r[key] for r in ok if r.get(key) is not None]
        if vals:
            out[key] = _stats(vals)
    return out


def _summary_line(s: dict[str, Any]) -> str:
    parts = [f"{s['trained']}/{s['models']} models trained"]
    if "test_accuracy" in s:
        a = s["test_accuracy"]
        parts.append(
            f"test accuracy mean {a['mean']:.2%}, min {a['min']:.2%}, median {a['median']:.2%}, max {a['max']:.2%}"
        )
    if "test_loss" in s:
        name = "test loss" if "test_accuracy" in s else "MSE"
        t = s["test_loss"]
        parts.append(f"{name} mean {t['mean']:.4g}, min {t['min']:.4g}, max {t['max']:.4g}")
    if s["diverged"]:
        parts.append(f"{s['diverged']} diverged (excluded)")
    return "; ".join(parts)


@app.command()
def zoo(
    out: Path = typer.Option(
        ..., "--out", help="Zoo folder (created; rerun the same command to resume)."
    ),
    task: str = typer.Option(DEFAULT_TASK, "--task", help=TASK_HELP),
    n: int = typer.Option(100, "--n", help="Number of models."),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="Folder with the data set files (fashion-mnist defaults to /usr/share/datasets/fashion-mnist).",
    ),
    seed: int = SEED,
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="Train only slice i/n of the shards (0-based), e.g. 0/4 in a job array.",
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Epochs (full-batch steps for INR tasks); task default if omitted."
    ),
    hidden: str | None = typer.Option(
        None, "--hidden", help="Hidden widths, e.g. 32,32,32 (MLP/SIREN) or 16,32 (CNN channels)."
    ),
    widths: str | None = typer.Option(
        None,
        "--widths",
        help="Several widths, e.g. 16,24,32,48,64: a zoo set with one member zoo per width "
        "(every hidden layer that wide; --n split evenly), for an aligner of any width.",
    ),
    lr: float | None = typer.Option(
        None, "--lr", help="Adam learning rate; task default if omitted."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Minibatch size (classifiers)."
    ),
    train_subset: int | None = typer.Option(
        None, "--train-subset", help="Train on a fixed subset of this many examples."
    ),
    views: int | None = typer.Option(
        None, "--views", help="Independent fits per target (INR tasks)."
    ),
    shard_size: int | None = typer.Option(
        None, "--shard-size", help="Models per shard file and per batched run."
    ),
    threads: int = typer.Option(
        1,
        "--threads",
        help="torch CPU threads (default 1: many small models train faster single-threaded; "
        "run --shard i/n slices in parallel processes to use more cores).",
    ),
    device: str = DEVICE,
    sources: str | None = typer.Option(
        None,
        "--from",
        help="Make the zoo from your checkpoints instead of training one: a glob such as "
        "'ckpts/*.pt' (quote it), with --model; a rerun adds new files and keeps the rest.",
    ),
    model: str | None = typer.Option(
        None, "--model", help="With --from: your class, FILE.py:NAME or package.module:NAME."
    ),
    model_args: str | None = typer.Option(
        None, "--model-args", help="With --from: the class's keyword arguments as JSON."
    ),
    input_shape: str | None = typer.Option(
        None, "--input-shape", help="With --from: one example's shape (needed for conv nets)."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="With --from: data (NAME or FILE.npz/.pt) for each model's test loss and accuracy, "
        "and for training an aligner on the zoo.",
    ),
    normalize: str = typer.Option(
        "standard", "--normalize", help="With --from: standard or none (built-in data sets)."
    ),
    split: str = typer.Option(
        "0.8,0.1,0.1", "--split", help="With --from: train,val,test fractions of the files."
    ),
) -> None:
    """Train a zoo of networks of one architecture, many at once; resumable and shardable.
    Or make one from your own checkpoints (--from).

    Example: deepalign zoo --task mlp-digits --n 2000 --out zoos/mlp-digits

    Example: deepalign zoo --from 'ckpts/*.pt' --model my.py:MyMLP --data digits --out zoos/mine
    """
    if sources is not None:
        _zoo_from(
            sources,
            out,
            model,
            model_args,
            input_shape,
            data,
            data_dir,
            normalize,
            split,
            seed,
            shard_size,
        )
        return
    if model is not None or data is not None:
        raise DeepAlignError("--model and --data make a zoo from checkpoints: add --from FILES")
    import torch

    from deepalign.zoo.build import ShardSlice, already_trained, build_zoo, prepare_zoo
    from deepalign.zoo.plan import make_plan

    dev = resolve_device(device)
    if threads <= 0:
        raise DeepAlignError(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)
    options = dict(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        train_subset=train_subset,
        views=views,
        shard_size=shard_size,
    )
    if widths is not None:
        from deepalign.zoo.zoo_set import open_set, parse_widths, plan_set

        members = plan_set(task, n, widths, seed, hidden=_parse_hidden(hidden), **options)
        open_set(
            out,
            members,
            {
                "task": task,
                "n": n,
                "seed": seed,
                "widths": parse_widths(widths),
                "options": options,
            },
        )
        plans = [(out / name, plan) for name, plan in members]
    else:
        plans = [(out, make_plan(task, n, seed, hidden=_parse_hidden(hidden), **options))]
    part = ShardSlice.parse(shard)
    mine = sum(len(p.shard_indices(k)) for _, p in plans for k in part.shards(p))
    datas = [prepare_zoo(p, folder, data_dir) for folder, p in plans]
    before = sum(already_trained(p, folder, part) for folder, p in plans)
    start = time.perf_counter()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    rows = []
    with Progress(*columns, console=err_console, transient=False) as bar:
        job = bar.add_task(f"zoo {task}", total=mine)
        offset = 0
        for (folder, plan), data in zip(plans, datas, strict=True):
            rows += build_zoo(
                plan,
                folder,
                data_dir=data_dir,
                shard=part,
                device=dev,
                on_progress=lambda done, o=offset: bar.update(job, completed=o + done),
                data=data,
            )
            offset += sum(len(plan.shard_indices(k)) for k in part.shards(plan))
    wall = time.perf_counter() - start
    s = summarize(rows)
    _out(f"{out}: {_summary_line(s)}")
    trained = mine - before
    rate = f", {trained / wall:.1f} models/s" if trained and wall > 0 else ""
    _out(
        f"this run: trained {trained} models ({before} already there) of slice "
        f"{part.index}/{part.count} in {wall:.1f} s{rate}"
    )
    if s["trained"] < s["models"]:
        _out("not complete: run the remaining --shard slices (or rerun without --shard) to finish")


def _zoo_from(
    sources, out, model, model_args, input_shape, data, data_dir, normalize, split, seed, shard_size
) -> None:
    """`zoo --from`: a zoo of the user's checkpoints."""
    from deepalign.cli.common import check_normalize
    from deepalign.zoo.from_checkpoints import zoo_from_checkpoints
    from deepalign.zoo.loader import Zoo

    if model is None:
        raise DeepAlignError("--from needs --model FILE.py:NAME (the class of the checkpoints)")
    try:
        fractions = [float(f) for f in split.split(",")]
    except ValueError:
        raise DeepAlignError(f"--split {split!r}: expected fractions like 0.8,0.1,0.1") from None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        job = bar.add_task("zoo from checkpoints", total=None)
        folders = zoo_from_checkpoints(
            sources,
            out,
            model,
            model_args=model_args,
            input_shape=input_shape,
            data=data,
            data_dir=data_dir,
            normalize=check_normalize(normalize),
            split_fractions=fractions,
            seed=seed,
            shard_size=shard_size or 256,
            on_progress=lambda done, total: bar.update(job, completed=done, total=total),
        )
    for folder in folders:
        z = Zoo(folder)
        _out(f"{folder}: {_summary_line(summarize(z.rows))}")


@app.command()
def export(
    zoo_dir: Path = typer.Argument(..., help="Zoo folder."),
    index: int = typer.Option(..., "--index", help="Model index in the zoo."),
    out: Path = typer.Option(..., "--out", help="Checkpoint to write (.safetensors)."),
) -> None:
    """Write one zoo model as a self-describing checkpoint (loadable with deepalign.load_model).

    Example: deepalign export zoos/mlp-digits --index 7 --out model7.safetensors
    """
    from deepalign.core.checkpoint import save_state
    from deepalign.zoo.loader import Zoo

    z = Zoo(zoo_dir)
    state = {k: v[0] for k, v in z.load([index]).items()}
    row = z.rows[index]
    meta = {"zoo": str(zoo_dir), "task": z.task, **{k: v for k, v in row.items() if k != "trained"}}
    save_state(state, out, z.config, meta)
    _out(f"wrote {out}  (zoo model {index}, {z.task}, split {row['split']})")


def describe_zoo(path: Path, as_json: bool) -> None:
    """`deepalign inspect ZOO_DIR`: task, architecture, splits, metric distribution, groups."""
    from deepalign.zoo.loader import Zoo

    z = Zoo(path)
    module = z.module()
    n_params = sum(p.numel() for p in module.parameters())
    info = {
        "zoo": str(path),
        "task": z.task,
        "kind": z.kind,
        "dataset": z.plan.dataset,
        "data_dir": z.info.get("data_dir"),
        "seed": z.plan.seed,
        "parameters_per_model": n_params,
        "shards": z.plan.n_shards,
        "shard_size": z.plan.shard_size,
        "complete": z.complete,
        "training": z.info.get("training"),
        "summary": summarize(z.rows),
        "groups": z.spec.describe(),
        "architecture": z.config,
    }
    if as_json:
        console.print_json(json.dumps(info))
        return
    p = _out
    p(f"{path}  zoo of {z.task} ({z.kind}), data set {z.plan.dataset or 'synthetic'}")
    p(_summary_line(info["summary"]))
    sp = info["summary"]["splits"]
    p(
        f"splits: train {sp['train']}, val {sp['val']}, test {sp['test']}; {z.plan.n_shards} shards of {z.plan.shard_size}"
    )
    t = z.plan.training
    p(
        f"training: adam lr {t.lr}, {t.epochs} epochs, batch {t.batch_size or 'full'}, subset {t.train_subset or 'all'}; seed {z.plan.seed}"
    )
    p(f"{n_params:,} parameters per model")
    p(str(module))
    for row in info["groups"]:
        p(f"  {row['group']:>6}  size {row['size']:>5}  {', '.join(row['axes'])}")
