"""Run every benchmark that needs nothing but this machine (what ``make bench`` does).

Each script runs in its own process with one torch thread and writes its JSON under ``--out``;
the numbers go into ``docs/benchmarks.md`` by hand, with the machine's load stated. The scripts that
need a trained zoo and aligner (``init_sweeps.py``, ``planted_recovery.py``, ``merge_many.py``)
run too when ``--zoo`` (and ``--aligner``) are given.

    .venv/bin/python benchmarks/run_all.py --out bench-out [--quick] [--zoo Z --aligner A]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and pairs (a smoke run)")
    ap.add_argument("--zoo", default=None, help="a digits MLP zoo, for the zoo-based scripts")
    ap.add_argument("--aligner", default=None, help="an aligner trained on --zoo")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = ["--repeats", "1"] if args.quick else []
    jobs: list[tuple[str, list[str]]] = [
        ("wm_vs_rebasin", ["--pairs", "3" if args.quick else "7"]),
        ("sinkhorn_speed", quick + (["--pairs", "8", "--chunks", "8"] if args.quick else [])),
        ("deepalign_speed", quick + (["--quick"] if args.quick else [])),
        ("zoo_speed", quick + ["--skip-fashion"]),
        ("transformer_merge", ["--quick"] if args.quick else []),
        ("transformer_scale", quick),
    ]
    if args.zoo:
        jobs.append(
            ("merge_many", ["--zoo", args.zoo, "--sizes", "2,3" if args.quick else "2,3,5,10"])
        )
    if args.zoo and args.aligner:
        jobs.append(("init_sweeps", ["--zoo", args.zoo, "--aligner", args.aligner]))
        jobs.append(("planted_recovery", ["--zoo", args.zoo, "--aligner", args.aligner]))
    failed = []
    for name, extra in jobs:
        cmd = [sys.executable, str(HERE / f"{name}.py"), *extra]
        takes_json = "--json" in (HERE / f"{name}.py").read_text()
        if takes_json:
            cmd += ["--json", str(out / f"{name}.json")]
        if "--threads" in (HERE / f"{name}.py").read_text():
            cmd += ["--threads", "1"]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        with open(out / f"{name}.txt", "w") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        took = time.perf_counter() - start
        print(f"   {'ok' if code == 0 else f'FAILED ({code})'} in {took:.0f} s -> {out / name}.*")
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)} (see their .txt logs)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
