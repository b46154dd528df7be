"""The hand-off from Deep-Align to Sinkhorn (issue 22.3), measured on VALIDATION pairs.

For each setting of the Sinkhorn stage of ``deepalign+sinkhorn`` (the scale of the aligner's
cosines as the start, the learning rate), the barrier of the hard answer after K Sinkhorn steps
(one run per setting, the trajectory recorded at every K), next to Sinkhorn from scratch.
Settings are chosen here; the test pairs are looked at once, by ``deepalign bench``.

    python benchmarks/handoff.py --zoo zoos/mlp-digits --aligner aligners/mlp-digits \
        --pairs 32 --out bench-out/handoff.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deepalign.core import permutation as P
from deepalign.lmc.curves import lmc_curves
from deepalign.nn import DeepAlign
from deepalign.solvers import Chain, run_chain
from deepalign.zoo.loader import Zoo

STEPS = (0, 5, 10, 20, 50, 100, 200)


def barriers(zoo: Zoo, a, b, perm, data) -> float:
    aligned = P.apply(zoo.spec, perm, b, batch_dims=1)
    curves = lmc_curves(zoo.module(), a, aligned, data, points=11)
    return float(torch.as_tensor(curves["barrier"]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--aligner", required=True)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--scales", default="1,4,16,64")
    ap.add_argument("--lrs", default="0.1,0.3")
    ap.add_argument("--out", default="bench-out/handoff.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo(args.zoo)
    aligner = DeepAlign.from_pretrained(args.aligner)
    val = zoo.indices("val")
    g = torch.Generator().manual_seed(args.seed)
    first = torch.randint(0, len(val), (args.pairs,), generator=g)
    second = (first + 1 + torch.randint(0, len(val) - 1, (args.pairs,), generator=g)) % len(val)
    a = zoo.load([val[i] for i in first.tolist()])
    b = zoo.load([val[i] for i in second.tolist()])
    train = zoo.dataset("train")
    evaluation = train.subset(min(1024, len(train)), seed=args.seed + 1)
    seeds = list(range(args.pairs))
    rows = []

    def run(method: str, options: dict) -> dict:
        start = time.perf_counter()
        out = run_chain(
            Chain.parse(method),
            a,
            b,
            zoo.spec,
            seeds=seeds,
            module=zoo.module(),
            data=train,
            aligner=aligner if "deepalign" in method else None,
            options={**options, "steps": max(STEPS), "trajectory_steps": list(STEPS)},
        )
        seconds = (time.perf_counter() - start) / args.pairs
        by_step: dict[int, list] = {}
        for pair in out.infos:
            for step, perm in pair[-1]["trajectory"]:
                by_step.setdefault(step, []).append(perm)
        curve = {}
        for step, perms in sorted(by_step.items()):
            stacked = {gname: torch.stack([p[gname] for p in perms]) for gname in perms[0]}
            curve[step] = barriers(zoo, a, b, stacked, evaluation)
        row = {"method": method, **options, "barrier_by_step": curve, "s_per_pair": seconds}
        print(json.dumps(row), flush=True)
        return row

    rows.append(run("sinkhorn", {}))
    for lr in [float(x) for x in args.lrs.split(",")]:
        for scale in [float(x) for x in args.scales.split(",")]:
            rows.append(run("deepalign+sinkhorn", {"init_scale": scale, "lr": lr}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
