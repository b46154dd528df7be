"""Aligner training on 1 and N processes (torchrun, gloo on CPU): seconds per step of the same
global batch, from the trainer's own per-epoch timing (epoch 1 is a warm-up; the median of the
later epochs is reported), and the ratio against one process in the same run.

    .venv/bin/python benchmarks/train_scale.py --zoo /work/zoos/mlp-digits --procs 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(zoo: str, procs: int, args: argparse.Namespace, folder: Path) -> list[float]:
    out = folder / f"p{procs}"
    train = [
        "train",
        "--zoo",
        zoo,
        "--out",
        str(out),
        "--size",
        args.size,
        "--batch",
        str(args.batch),
    ]
    train += ["--epochs", str(args.epochs), "--steps", str(args.steps)]
    if procs == 1:
        cmd = [sys.executable, "-m", "deepalign", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(procs), "-m", "deepalign", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_seconds"] / args.steps for r in rows[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--size", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(p) for p in args.procs.split(",")):
            per_step = run(args.zoo, n, args, Path(tmp))
            result[n] = statistics.median(per_step)
            base = result[min(result)]
            print(
                f"{n} process(es): {result[n]:.3f} s/step (median of {len(per_step)} epochs), "
                f"{base / result[n]:.2f}x one process",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds_per_step": result, **vars(args)}, indent=1))


if __name__ == "__main__":
    main()
