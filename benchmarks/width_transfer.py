"""One aligner on zoos of other widths (issue 21.4): Deep-Align's barrier next to WM's on a zoo
split's pairs. ``--split val`` chooses between aligners; the final table comes from ``deepalign
bench`` on the test pairs, once.

    python benchmarks/width_transfer.py --aligners aligners/narrow,aligners/w32 \
        --zoos zoos/mlp-digits-wide,zoos/w256 --split val --pairs 64 --out bench-out/widths.json
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
from deepalign.solvers import align
from deepalign.zoo.loader import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aligners", required=True, help="comma-separated aligner folders")
    ap.add_argument("--zoos", required=True, help="comma-separated zoo folders")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/widths.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for zoo_path in args.zoos.split(","):
        zoo = Zoo(zoo_path)
        idx = zoo.indices(args.split)
        g = torch.Generator().manual_seed(args.seed)
        first = torch.randint(0, len(idx), (args.pairs,), generator=g)
        second = (first + 1 + torch.randint(0, len(idx) - 1, (args.pairs,), generator=g)) % len(idx)
        a = zoo.load([idx[i] for i in first.tolist()])
        b = zoo.load([idx[i] for i in second.tolist()])
        data = zoo.dataset("test")

        def barrier(perm, a=a, b=b, zoo=zoo, data=data) -> list[float]:
            moved = P.apply(zoo.spec, perm, b, batch_dims=1)
            curves = lmc_curves(zoo.module(), a, moved, data, points=25)
            return torch.as_tensor(curves["barrier"]).tolist()

        n = args.pairs
        wm = [
            align(
                {k: v[i] for k, v in a.items()},
                {k: v[i] for k, v in b.items()},
                zoo.spec,
                "wm",
                seed=i,
            )[0]
            for i in range(n)
        ]
        wm_perm = {gname: torch.stack([p[gname] for p in wm]) for gname in wm[0]}
        ident = {gname: torch.arange(s).expand(n, s) for gname, s in zoo.spec.groups.items()}
        results = {"identity": barrier(ident), "wm": barrier(wm_perm)}
        for path in args.aligners.split(","):
            model = DeepAlign.from_pretrained(path)
            start = time.perf_counter()
            perm = model.align(a, b, zoo.spec)
            seconds = (time.perf_counter() - start) / n
            results[f"deepalign:{path}"] = barrier(perm)
            results[f"seconds:{path}"] = seconds
        for name, vals in results.items():
            if name.startswith("seconds"):
                continue
            t = torch.tensor(vals)
            row = {
                "zoo": zoo_path,
                "widths": list(zoo.spec.groups.values()),
                "split": args.split,
                "method": name,
                "barrier": float(t.mean()),
                "std": float(t.std()),
                "vs_wm": float((t - torch.tensor(results["wm"])).mean()),
                "vs_wm_se": float((t - torch.tensor(results["wm"])).std() / n**0.5),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
