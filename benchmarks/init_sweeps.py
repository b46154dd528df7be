"""Does a Deep-Align start help weight matching? Sweeps and objective of WM from three starts.

For held-out test pairs of a zoo: WM from the identity (the reference Git Re-Basin loop), WM from
its default forward-greedy start, and WM started from the aligner's answer (``deepalign+wm``).
Reports medians of sweeps, linear assignments and the objective reached.

    .venv/bin/python benchmarks/init_sweeps.py --zoo /work/zoos/mlp-digits --aligner DIR --pairs 64
"""

from __future__ import annotations

import argparse
import statistics

import torch

from deepalign.nn import DeepAlign
from deepalign.solvers import align
from deepalign.zoo import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--aligner", required=True)
    ap.add_argument("--pairs", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo)
    idx = zoo.indices("test")
    n = min(args.pairs, len(idx) // 2)
    a, b = zoo.load(idx[:n]), zoo.load(idx[n : 2 * n])
    init = DeepAlign.from_pretrained(args.aligner).align(a, b)
    rows: dict[str, list[tuple[int, int, float]]] = {"identity": [], "forward": [], "deepalign": []}
    for i in range(n):
        ai, bi = {k: v[i] for k, v in a.items()}, {k: v[i] for k, v in b.items()}
        for name, kw in (
            ("identity", {"start": "identity"}),
            ("forward", {}),
            ("deepalign", {"init": {g: p[i] for g, p in init.items()}}),
        ):
            _, info = align(ai, bi, zoo.spec, "wm", seed=i, **kw)
            rows[name].append((info["sweeps"], info["assignments"], info["objective"]))
    print(f"{n} test pairs of {args.zoo}")
    print("| WM start | sweeps (median) | assignments (median) | objective (mean) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        sweeps = statistics.median(x[0] for x in r)
        lsa = statistics.median(x[1] for x in r)
        obj = statistics.mean(x[2] for x in r)
        print(f"| {name} | {sweeps} | {lsa} | {obj:.3f} |")
    better = sum(
        d[2] >= w[2] - 1e-9 for d, w in zip(rows["deepalign"], rows["identity"], strict=True)
    )
    print(f"deepalign start reaches at least the identity start's objective on {better}/{n} pairs")


if __name__ == "__main__":
    main()
