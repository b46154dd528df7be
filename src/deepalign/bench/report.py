"""The bench's written outputs: ``bench.json``, ``bench.md`` (the paper's Table 1-2 shape) and the
two figures, written all together (each atomically) once the run is complete."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepalign.core.io import atomic_path

OUTPUTS = ("bench.json", "bench.md", "lmc.png", "sinkhorn_init.png")
SHORT_COLUMNS = ("method", "barrier", "gap closed", "AUC", "acc@λ=.5", "WM obj.", "s/pair")
COLUMNS = (
    "Method",
    "Barrier ↓",
    "Gap closed ↑",
    "AUC ↓",
    "Acc. @ λ=0.5 ↑",
    "WM objective ↑",
    "L2 ↓",
    "Time / pair (s) ↓",
)


def _pm(stat: Mapping[str, Any] | None, fmt: str, compact: bool = False) -> str:
    if not stat or stat.get("mean") is None or math.isnan(stat["mean"]):
        return "—"
    if compact:
        return f"{stat['mean']:{fmt}}"
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"


def _acc(stat: Mapping[str, Any] | None, compact: bool = False) -> str:
    if not stat:
        return "—"
    if compact:
        return f"{100 * stat['mean']:.1f}%"
    return f"{100 * stat['mean']:.1f}% ± {100 * stat['std']:.1f}"


def _time(entry: Mapping[str, Any], compact: bool) -> str:
    sec = entry["summary"]["seconds"]["mean"]
    timing = entry.get("timing", "per pair")
    text = f"{sec:.2g}" if compact else f"{sec:.3g}"
    mark = " ᵇ" if "batched" in timing else ""
    firsts = entry.get("first_stage_seconds_per_pair") or entry.get("batched_seconds_per_pair")
    if compact or " + " not in timing or not firsts:
        return f"{text}{mark}"
    first = sum(firsts) / len(firsts)
    return f"{text}{mark} ({first:.2g} + {sec - first:.3g})"


def _gap(stat: Mapping[str, Any] | None, compact: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    if compact:
        return f"{stat['mean']:.2f}"
    seeds = [v for v in stat.get("seed_values", []) if v is not None]
    per_seed = f" ({' / '.join(f'{v:.2f}' for v in seeds)})" if len(seeds) > 1 else ""
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}{per_seed}"


def table_rows(result: Mapping[str, Any], compact: bool = False) -> list[list[str]]:
    """One row per method, cells as in the markdown table (failed methods carry their error).

    ``compact`` (the terminal, :data:`SHORT_COLUMNS`): the method's name only, means without
    their std, no L2 column, and no split of chained times.
    """
    rows = []
    for entry in result["methods"].values():
        name = entry["method"] if compact else f"{entry['label']} (`{entry['method']}`)"
        width = len(SHORT_COLUMNS if compact else COLUMNS)
        if entry["status"] != "ok":
            err = str(entry.get("error", "unknown error")).replace("|", "/")
            rows.append([name, "failed" if compact else f"failed: {err}"] + ["—"] * (width - 2))
            continue
        s = entry["summary"]
        row = [
            name,
            _pm(s["barrier"], ".3f", compact),
            _gap(s.get("gap_closed"), compact),
            _pm(s["auc"], ".3f", compact),
            _acc(s["acc_mid"], compact),
            _pm(s["objective"], ".2f", compact),
        ]
        if not compact:
            row.append(_pm(s["l2"], ".2f"))
        row.append(_time(entry, compact))
        rows.append(row)
    return rows


def markdown(result: Mapping[str, Any]) -> str:
    """``bench.md``: a heading, the settings in one paragraph, the table and its footnotes."""
    s = result["settings"]
    lines = [
        f"# deepalign bench: {s['task']}",
        "",
        f"Zoo `{s['zoo']}`; aligner `{s['aligner'] or '—'}`. {s['pairs']} held-out pairs "
        f"({s['pair_kind']}, of {s['pairs_available']} possible) × {s['seeds']} seed(s) "
        f"(each seed re-draws the pairs and the solver seeds). Loss along the segment: "
        f"{s['loss']} on {s['eval_examples']} {s['eval_split']} examples at {s['points']} "
        f"values of λ in [0, 1] (λ = 0 is A, 1 is aligned B). Device {s['device']}, "
        f"{s['threads']} thread(s).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    lines += [
        "",
        "Mean ± std over all pairs and seeds (per-seed means are in `bench.json`). Barrier and AUC "
        "of the loss follow the paper (§6: gap to the chord between the end points; max and "
        "trapezoid integral, clipped at 0). Gap closed: (WM − method) / (WM − best) on mean "
        "barriers, the best being the lowest method of this run (0 = weight matching, 1 = the "
        "best; ± its std over resampled pairs, per seed in brackets). WM objective: "
        "`sum <A, aligned B>` over the weights (higher is better); L2: the weight distance after "
        "alignment.",
        "",
        "ᵇ Batched: all pairs aligned in one call (Deep-Align: one forward pass per chunk of pairs; "
        f"Sinkhorn: {s.get('sinkhorn_chunk', 1)} pairs optimised together per run, each with its "
        "own seed); the time is the amortised time per pair. A chain's time is the sum of its "
        "stages' times per pair, in brackets (first stage + the rest); a chain starts each stage "
        "from the previous stage's answer (a Sinkhorn right after Deep-Align from the aligner's "
        "similarities, its soft answer).",
        "",
        f"Activation matching sees {s['data_examples']} {s['data_split']} examples. Sinkhorn "
        f"(alone and as a second stage): {s['sinkhorn_steps']} steps, loss {s['sinkhorn_loss']}"
        + (f", on the same {s['data_examples']} examples" if s["data_split"] == "train" else "")
        + ". `sinkhorn_init.png`: barrier of the hard permutation along those steps on the "
        f"first {s['trajectory_pairs']} pairs of each seed, by start (near-uniform scores, the "
        "identity, and each chain's first answer); `lmc.png`: mean loss curves.",
    ]
    if s.get("options"):
        lines += ["", f"Extra solver options: `{json.dumps(s['options'])}`."]
    failed = [e for e in result["methods"].values() if e["status"] != "ok"]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"`{e['method']}`: {e['error']}" for e in failed)]
    return "\n".join(lines) + "\n"


def write_outputs(out: str | os.PathLike, result: Mapping[str, Any]) -> list[Path]:
    """Write the four outputs into ``out`` (created); each file appears whole or not at all."""
    from deepalign.bench.plots import plot_lmc, plot_sinkhorn_init

    folder = Path(out)
    paths = [folder / name for name in OUTPUTS]
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        tmps[0].write_text(json.dumps(result, indent=1) + "\n")
        tmps[1].write_text(markdown(result))
        plot_lmc(tmps[2], result)
        plot_sinkhorn_init(tmps[3], result)
    return paths
