"""Share of neurons whose planted permutation a trained aligner recovers on held-out networks.

Each test-split network ``v`` is paired with ``t # aug(v)`` (a fresh random permutation ``t`` of
an augmented copy, with the training augmentations); the aligner must return ``t⁻¹``. Weight
matching on the same pairs is the reference.

    .venv/bin/python benchmarks/planted_recovery.py --zoo /work/zoos/mlp-digits --aligner DIR
"""

from __future__ import annotations

import argparse

import torch

from deepalign.core import permutation as P
from deepalign.nn import DeepAlign
from deepalign.solvers import align
from deepalign.training.augment import Augment
from deepalign.zoo import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--aligner", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo)
    model = DeepAlign.from_pretrained(args.aligner)
    spec = zoo.spec
    states = zoo.load(zoo.indices("test"))
    n = next(iter(states.values())).shape[0]
    g = torch.Generator().manual_seed(args.seed)
    t = P.random_permutation(spec, generator=g, batch=n)
    moved = P.apply(spec, t, Augment()(states, spec, g), batch_dims=1)
    want = P.invert(t)
    pred = model.align(states, moved)
    total = sum(v.numel() for v in want.values())
    hits = sum(int((pred[k] == want[k]).sum()) for k in want)
    wm_hits = 0
    for i in range(n):
        perm, _ = align(
            {k: v[i] for k, v in states.items()}, {k: v[i] for k, v in moved.items()}, spec, "wm"
        )
        wm_hits += sum(int((perm[k] == want[k][i]).sum()) for k in want)
    print(
        f"{n} test networks of {args.zoo}, training augmentations (noise, dropout, scaling, pruning)"
    )
    print(f"deepalign: {hits / total:.2%} of neurons recovered; wm: {wm_hits / total:.2%}")


if __name__ == "__main__":
    main()
