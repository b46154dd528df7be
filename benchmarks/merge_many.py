"""Test accuracy of N test networks of a classifier zoo merged into one, by MergeMany vs plain averaging.

For each N, the first N test-split networks are merged with ``merge_many`` (each method given) and
by the naive mean of their weights; the members' mean accuracy is the reference.

    .venv/bin/python benchmarks/merge_many.py --zoo /work/zoos/mlp-digits --sizes 2,3,5,10
"""

from __future__ import annotations

import argparse
import time

import torch

from deepalign.solvers.merge_many import mean_state, merge_many
from deepalign.zoo import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--sizes", default="2,3,5,10")
    ap.add_argument("--methods", default="wm")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo)
    if zoo.kind != "classifier":
        raise SystemExit("error: the benchmark needs a classifier zoo")
    test, net = zoo.dataset("test"), zoo.module().eval()
    train = zoo.dataset("train")

    def accuracy(state: dict) -> float:
        net.load_state_dict(state)
        with torch.no_grad():
            return (net(test.x).argmax(1) == test.y).float().mean().item()

    idx = zoo.indices("test")
    print("| N | members (mean) | naive average | " + " | ".join(args.methods.split(",")) + " |")
    print("|---" * (3 + len(args.methods.split(","))) + "|")
    for n in [int(s) for s in args.sizes.split(",")]:
        states = [{k: v[0] for k, v in zoo.load([i]).items()} for i in idx[:n]]
        cells = []
        for method in args.methods.split(","):
            start = time.perf_counter()
            merged, _, info = merge_many(
                states, zoo.spec, method, module=zoo.module(), data=train, seed=args.seed
            )
            secs = time.perf_counter() - start
            cells.append(f"{accuracy(merged):.1%} ({info['passes']} passes, {secs:.2f} s)")
        members = sum(accuracy(s) for s in states) / n
        naive = accuracy(mean_state(states))
        print(f"| {n} | {members:.1%} | {naive:.1%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
