"""`deepalign bench` and `deepalign demo`: the paper's comparison on a zoo, and the end-to-end demo."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table

from deepalign.cli.common import DEVICE, SEED, app, console, progress, resolve_device
from deepalign.errors import DeepAlignError

METHODS_HELP = (
    "Comma-separated methods (default: identity,wm,am,sinkhorn,wm+sinkhorn,deepalign,"
    "deepalign+wm,deepalign+sinkhorn)."
)
THREADS = typer.Option(
    None, "--threads", help="torch CPU threads (1 is often fastest on a busy machine)."
)


def _threads(threads: int | None) -> None:
    if threads is not None:
        if threads <= 0:
            raise DeepAlignError(f"--threads must be positive, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _parse_opts(items: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD:KEY=VALUE`` -> ``{method: {key: value}}`` (values parsed as JSON when they can be)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, value = item.partition("=")
        method, colon, key = head.partition(":")
        if not eq or not colon or not method.strip() or not key.strip():
            raise DeepAlignError(
                f"--opt {item!r}: expected METHOD:KEY=VALUE, e.g. sinkhorn:lr=0.05"
            )
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method.strip(), {})[key.strip()] = parsed
    return out


def print_table(result: Mapping[str, Any], title: str) -> None:
    """The bench table on the terminal (the same cells as bench.md)."""
    from deepalign.bench.report import SHORT_COLUMNS, table_rows

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    for i, col in enumerate(SHORT_COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in table_rows(result, compact=True):
        table.add_row(*row)
    console.print(table)
    for entry in result["methods"].values():
        if entry["status"] != "ok":
            console.print(
                f"{entry['method']} failed: {entry['error']}", markup=False, highlight=False
            )
    console.print(
        "means over all pairs and seeds (± std in bench.md); ᵇ batched: pairs solved together, "
        "time amortised per pair (a chain's time is the sum of its stages' times).",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


class _BenchBars:
    """Two bars: runs (method x seed) overall, and the pairs of the current run.

    They appear with the first event, so a bad input fails before any bar is drawn.
    """

    def __init__(self, bar) -> None:
        self.bar = bar
        self.overall: Any = None
        self.current: Any = None

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.overall is None:
            self.overall = self.bar.add_task("methods", total=ev["runs"])
            self.current = self.bar.add_task("pairs", total=ev["total"])
        finished = ev["done"] >= ev["total"]
        self.bar.update(
            self.overall,
            total=ev["runs"],
            completed=min(ev["runs"], ev["run"] + (1 if finished else 0)),
            description=f"methods ({ev['method']})",
        )
        self.bar.update(
            self.current,
            total=ev["total"],
            completed=ev["done"],
            description=f"  seed {ev['seed']}: {ev['stage']}",
        )


@app.command()
def bench(
    zoo: Path = typer.Option(..., "--zoo", help="Zoo folder (its test split is benchmarked)."),
    aligner: Path | None = typer.Option(
        None, "--aligner", help="Trained Deep-Align folder (needed by the deepalign* methods)."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Folder for bench.json, bench.md, lmc.png, sinkhorn_init.png."
    ),
    pairs: int = typer.Option(100, "--pairs", help="Held-out test pairs per seed."),
    methods: str | None = typer.Option(None, "--methods", help=METHODS_HELP),
    seeds: int = typer.Option(
        1, "--seeds", help="Seeds: each re-draws the pairs and solver seeds."
    ),
    points: int = typer.Option(25, "--points", help="Values of lambda on each LMC curve."),
    sinkhorn_steps: int = typer.Option(
        200, "--sinkhorn-steps", help="Sinkhorn gradient steps (paper: 1000)."
    ),
    data_examples: int = typer.Option(
        2000, "--data-examples", help="Training examples that am and Sinkhorn's task loss see."
    ),
    eval_examples: int | None = typer.Option(
        None,
        "--eval-examples",
        help="Test examples of the LMC curves (default: the whole test split).",
    ),
    trajectory_pairs: int = typer.Option(
        16, "--trajectory-pairs", help="Pairs per seed traced along Sinkhorn for sinkhorn_init.png."
    ),
    opt: list[str] = typer.Option(
        [],
        "--opt",
        "-o",
        help="Solver option METHOD:KEY=VALUE, repeatable (e.g. -o sinkhorn:lr=0.05).",
    ),
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="Run only slice i/n of every seed's pairs (or 'auto': the job array's index and "
        "count); assemble the tables with --gather once every slice is done.",
    ),
    gather: bool = typer.Option(
        False, "--gather", help="Assemble the tables from the finished --shard runs in --out."
    ),
    seed: int = SEED,
    device: str = DEVICE,
    threads: int | None = THREADS,
) -> None:
    """Every alignment method on the same held-out pairs of a zoo: barrier, AUC, time, curves.

    Example: deepalign bench --zoo zoos/mlp-digits --aligner aligners/mlp-digits --out bench/mlp-digits

    On a job array: deepalign bench ... --out B --shard auto (one job per slice), then
    deepalign bench ... --out B --gather (the same options): the numbers of one process.
    """
    from deepalign.bench import DEFAULT_METHODS, run_bench

    _threads(threads)
    dev = resolve_device(device)
    options = _parse_opts(opt)
    with progress() as bar:
        result = run_bench(
            zoo,
            aligner,
            out,
            pairs=pairs,
            methods=methods if methods is not None else DEFAULT_METHODS,
            seeds=seeds,
            points=points,
            sinkhorn_steps=sinkhorn_steps,
            device=dev,
            on_progress=_BenchBars(bar),
            seed=seed,
            data_examples=data_examples,
            eval_examples=eval_examples,
            trajectory_pairs=trajectory_pairs,
            options=options,
            shard=shard,
            gather=gather,
        )
    if result.get("format") == "deepalign-bench-shard/1":
        i, n = result["shard"]
        console.print(
            f"shard {i}/{n}: {sum(result['pairs'])} pairs done, kept in {result['file']}; "
            "when every shard is done: the same command with --gather instead of --shard",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        for method, error in result["failed"].items():
            console.print(f"{method} failed: {error}", markup=False, highlight=False)
        return
    s = result["settings"]
    print_table(result, f"{s['task']}: {s['pairs']} test pairs x {s['seeds']} seed(s)")
    console.print(
        f"wrote {out}/bench.md, bench.json, lmc.png, sinkhorn_init.png "
        f"({result['wall_seconds']:.0f} s)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def demo(
    out: Path = typer.Option(
        Path("demo-out"), "--out", help="Folder for the zoo, aligner and bench."
    ),
    quick: bool = typer.Option(False, "--quick", help="Tiny everything (well under a minute)."),
    device: str = DEVICE,
    threads: int | None = THREADS,
) -> None:
    """The main job end to end on scikit-learn's digits: zoo, Deep-Align training, bench.

    Rerunning reuses what is already built. Example: deepalign demo --out demo-out
    """
    from deepalign.bench.demo import DemoHooks, run_demo

    _threads(threads)
    dev = resolve_device(device)

    def stage(name: str, message: str) -> None:
        console.print(f"[bold]{name}[/bold]: {message}", highlight=False, soft_wrap=True)

    with progress() as bar:
        tasks: dict[str, Any] = {}

        def zoo_hook(done: float, total: int) -> None:
            if "zoo" not in tasks:
                tasks["zoo"] = bar.add_task("zoo networks", total=total)
            bar.update(tasks["zoo"], completed=done)

        def train_hook(epoch: int, epochs: int, step: int, steps: int, means: dict) -> None:
            if "train" not in tasks:
                tasks["train"] = bar.add_task("aligner steps", total=epochs * steps)
            bar.update(
                tasks["train"],
                completed=epoch * steps + step + 1,
                description=f"aligner epoch {epoch + 1}/{epochs} loss {means.get('loss', float('nan')):.3f}",
            )

        res = run_demo(
            out,
            quick=quick,
            device=dev,
            hooks=DemoHooks(stage=stage, zoo=zoo_hook, train=train_hook, bench=_BenchBars(bar)),
        )
    s = res["result"]["settings"]
    print_table(res["result"], f"{s['task']} ({res['profile']} demo): {s['pairs']} test pairs")
    console.print(
        f"table: {res['bench'] / 'bench.md'}\nplots: {res['bench'] / 'lmc.png'}, "
        f"{res['bench'] / 'sinkhorn_init.png'}\ndata: {res['bench'] / 'bench.json'}\n"
        f"({res['seconds']:.0f} s; reused: "
        + (", ".join(k for k, v in res["reused"].items() if v) or "nothing")
        + ")",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
