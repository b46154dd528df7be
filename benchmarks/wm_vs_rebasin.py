"""Weight matching: deepalign's ``wm`` against the PyPI package ``rebasin`` (0.0.47) on the same pairs.

For each pair of independently initialised (optionally briefly trained) networks, both solvers run
from the identity with a seeded random group order; we record the objective reached
(``sum_k <a_k, aligned b_k>``, computed by the same function for both), the seconds, the number of
linear assignments and the share of our time spent inside them (the floor). Medians over pairs;
the ratio is taken within the same run. Needs ``pip install rebasin==0.0.47`` (the ``bench`` extra).

    python benchmarks/wm_vs_rebasin.py --pairs 7 [--trained-steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import deepalign as da
from deepalign.solvers import align, weight_inner

ARCHS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-784-512x3-10": (lambda: da.mlp([784, 512, 512, 512, 10]), (784,)),
    "cnn-3x8x8-64-128-256": (lambda: da.cnn(3, [64, 128, 256], 10, 8), (3, 8, 8)),
}


def brief_training(model: nn.Module, steps: int, seed: int) -> nn.Module:
    """A few hundred Adam steps on Fashion-MNIST (MLP only), so weights are not just at init."""
    from deepalign.data import load

    ds = load("fashion-mnist")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    done = 0
    while done < steps:
        for x, y in ds.batches(128, generator=g, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(model(x.flatten(1)), y).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model.eval()


class CountingLSA:
    """Wraps scipy's solver inside ``rebasin`` to count its calls and time."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.calls, self.seconds = fn, 0, 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


def run_rebasin(ma: nn.Module, mb: nn.Module, x: torch.Tensor, seed: int) -> dict:
    import rebasin.permutation_coordinate_descent as pcd_mod
    from rebasin import PermutationCoordinateDescent

    counter = CountingLSA(pcd_mod.linear_sum_assignment)
    pcd_mod.linear_sum_assignment = counter
    try:
        b = copy.deepcopy(mb)
        t0 = time.perf_counter()
        pcd = PermutationCoordinateDescent(ma, b, x)
        t1 = time.perf_counter()
        torch.manual_seed(seed)  # rebasin draws its group order from the global generator
        pcd.calculate_permutations()
        t2 = time.perf_counter()
        pcd.apply_permutations()
        t3 = time.perf_counter()
    finally:
        pcd_mod.linear_sum_assignment = counter.fn
    with torch.no_grad():
        same = float((b.eval()(x) - mb.eval()(x)).abs().max())
    return {
        "trace_s": t1 - t0,
        "solve_s": t2 - t1,
        "total_s": t3 - t0,
        "assignments": counter.calls,
        "lsa_s": counter.seconds,
        "state": b.state_dict(),
        "output_diff": same,
    }


def run_ours(ma: nn.Module, mb: nn.Module, seed: int, start: str = "forward") -> dict:
    t0 = time.perf_counter()
    spec = da.spec_for_module(ma)
    t1 = time.perf_counter()
    a, b = ma.state_dict(), mb.state_dict()
    perm, info = align(a, b, spec, "wm", seed=seed, history=False, start=start)
    aligned = da.apply(spec, perm, b)
    t2 = time.perf_counter()
    return {
        "trace_s": t1 - t0,
        "solve_s": info["seconds"],
        "total_s": t2 - t0,
        "assignments": info["assignments"],
        "solves": info["solves"],
        "sweeps": info["sweeps"],
        "lsa_s": info["lsa_seconds"],
        "state": aligned,
    }


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--trained-steps", type=int, default=0, help="brief training (MLP only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.archs.split(","):
        make, shape = ARCHS[name]
        rows = []
        for i in range(args.pairs):
            torch.manual_seed(1000 + i)
            ma, mb = make().eval(), make().eval()
            if args.trained_steps and name.startswith("mlp"):
                brief_training(ma, args.trained_steps, 2 * i)
                brief_training(mb, args.trained_steps, 2 * i + 1)
            spec = da.spec_for_module(ma)
            x = torch.randn(2, *shape)
            if i == 0:  # warm-up (imports, first-call costs) for both, not recorded
                run_ours(ma, mb, 0)
                run_rebasin(ma, mb, x, 0)
            runs: list[tuple[str, Callable[[], dict]]] = [
                ("ours", partial(run_ours, ma, mb, i)),
                ("ours_identity_start", partial(run_ours, ma, mb, i, "identity")),
                ("rebasin", partial(run_rebasin, ma, mb, x, i)),
            ]
            if i % 2:
                runs.reverse()  # alternate who runs first, so drifting machine load hits all
            row = {}
            for who, fn in runs:
                r = fn()
                r["objective"] = weight_inner(ma.state_dict(), r.pop("state"), spec)
                row[who] = r
            row["objective_before"] = weight_inner(ma.state_dict(), mb.state_dict(), spec)
            rows.append(row)
            print(
                f"{name} pair {i}: "
                + " | ".join(
                    f"{who}: objective {r['objective']:.4f}, solve {r['solve_s']:.3f} s, "
                    f"{r['assignments']} LSA"
                    for who, r in row.items()
                    if isinstance(r, dict)
                )
                + f" | rebasin output diff {row['rebasin']['output_diff']:.2g}",
                flush=True,
            )
        summary: dict[str, float] = {"pairs": len(rows)}
        theirs = [r["rebasin"] for r in rows]
        for who in ("ours", "ours_identity_start", "rebasin"):
            mine = [r[who] for r in rows]
            summary[f"{who}_objective_median"] = med([m["objective"] for m in mine])
            summary[f"{who}_solve_s_median"] = med([m["solve_s"] for m in mine])
            summary[f"{who}_total_s_median"] = med([m["total_s"] for m in mine])
            summary[f"{who}_assignments_median"] = med([m["assignments"] for m in mine])
            summary[f"{who}_lsa_share_median"] = med([m["lsa_s"] / m["solve_s"] for m in mine])
            if who != "rebasin":
                pairs = list(zip(mine, theirs, strict=True))
                summary[f"{who}_objective_ge_rebasin"] = sum(
                    m["objective"] >= t["objective"] - 1e-9 for m, t in pairs
                )
                summary[f"{who}_speedup_solve"] = med(
                    [t["solve_s"] / m["solve_s"] for m, t in pairs]
                )
                summary[f"{who}_speedup_total"] = med(
                    [t["total_s"] / m["total_s"] for m, t in pairs]
                )
        results[name] = {"summary": summary, "rows": rows}
        print(json.dumps({name: summary}, indent=1), flush=True)
    meta = {
        "threads": args.threads,
        "trained_steps": args.trained_steps,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
