"""Sinkhorn re-basin speed: the previous per-pair solver vs the new per-pair solver vs the batched one.

All three solve held-out pairs of a digits MLP zoo (64-32-32-32-10) with the same settings (task
loss on the training split, 200 steps, batch 128, lr 0.1, tau 1, 20 Sinkhorn iterations). The
previous solver is reproduced below as it was (one score matrix and one log-domain Sinkhorn call per
group, ``torch.optim.Adam``, the merged state dict rebuilt every step, ``functional_call``). Reports
pairs per second (medians of ``--repeats`` runs, ratios against the previous solver in the same
run), and the quality reached: mean LMC barrier (cross-entropy on the test split) and mean final
loss, on the same pairs. The randomness of the new solvers is drawn differently from the old one
(per-pair generators, shared data order), so single pairs differ; the means should not.

    python benchmarks/sinkhorn_speed.py --threads 1
    python benchmarks/sinkhorn_speed.py --threads 1 --loss l2 --zoo zoos/mlp-digits
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from deepalign.bench.pairs import candidate_pairs, draw_pairs
from deepalign.core.functional import unstack_state
from deepalign.core.permutation import apply, apply_soft
from deepalign.data.batches import labelled_batches
from deepalign.lmc.curves import lmc_curves
from deepalign.solvers.assignment import linear_assignment, log_sinkhorn
from deepalign.solvers.objective import cost_keys
from deepalign.solvers.sinkhorn import sinkhorn_batch, sinkhorn_rebasin
from deepalign.zoo.build import build_zoo
from deepalign.zoo.loader import Zoo
from deepalign.zoo.plan import make_plan


def old_sinkhorn(a, b, spec, module, data, seed, steps, loss, lr=0.1, batch_size=128):
    """The previous solver's loop (commit d1b3a68), trimmed to what this benchmark calls."""
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for g, n in spec.groups.items():
        scores[g] = (0.01 * torch.randn(n, n, generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam(scores.values(), lr=lr)
    keys = cost_keys(spec, a)
    net = copy.deepcopy(module).eval()

    def forever():
        for _ in itertools.count():
            yield from labelled_batches(data, batch_size, generator=gen, shuffle=True)

    batches = forever()
    history = []
    for _ in range(steps):
        mats = {g: log_sinkhorn(s, 20).exp() for g, s in scores.items()}
        if loss == "l2":
            soft = apply_soft(spec, mats, {k: b[k] for k in keys})
            value = sum(((a[k] - soft[k]) ** 2).sum() for k in keys)
        else:
            x, y = next(batches)
            lam = float(torch.rand((), generator=gen))
            soft = apply_soft(spec, mats, b)
            merged = {
                k: (1 - lam) * v + lam * soft[k] if v.is_floating_point() else v
                for k, v in a.items()
            }
            value = F.cross_entropy(functional_call(net, merged, (x,)), y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        history.append(float(value.detach()))
    return {g: linear_assignment(s.detach()) for g, s in scores.items()}, history


def _median_rate(times: list[float], pairs: int) -> float:
    return pairs / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=None, help="digits MLP zoo (default: build a small one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--loss", choices=["task", "l2"], default="task")
    ap.add_argument("--old-pairs", type=int, default=3, help="pairs the previous solver solves")
    ap.add_argument("--new-pairs", type=int, default=8, help="pairs the new per-pair solver solves")
    ap.add_argument("--pairs", type=int, default=32, help="pairs of the batched runs")
    ap.add_argument("--chunks", default="8,32", help="batch sizes of the batched runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # first use imports for seconds
    load_before = os.getloadavg()

    tmp = None
    if args.zoo is None:
        tmp = tempfile.TemporaryDirectory()
        args.zoo = os.path.join(tmp.name, "zoo")
        print("building a 120-model digits zoo ...", flush=True)
        build_zoo(make_plan("mlp-digits", 120, seed=0), args.zoo)
    zoo = Zoo(args.zoo)
    pairs = draw_pairs(candidate_pairs(zoo), args.pairs, seed=0)
    n = len(pairs)
    a = zoo.load([p[0] for p in pairs])
    b = zoo.load([p[1] for p in pairs])
    spec, module = zoo.spec, zoo.module()
    train, test = zoo.dataset("train"), zoo.dataset("test")
    data = train if args.loss == "task" else None
    seeds = list(range(100, 100 + n))
    chunks = [int(c) for c in args.chunks.split(",")]
    old_n, new_n = min(args.old_pairs, n), min(args.new_pairs, n)

    # warm-up (lazy initialisation of vmap and friends), untimed
    sinkhorn_batch(
        {k: v[:2] for k, v in a.items()}, {k: v[:2] for k, v in b.items()}, spec,
        module=module, data=data, loss=args.loss, steps=2,
    )  # fmt: skip

    times: dict[str, list[float]] = {"old": [], "new": []} | {f"batch{c}": [] for c in chunks}
    perms: dict[str, dict] = {}
    finals: dict[str, list[float]] = {}
    for r in range(args.repeats):
        t = time.perf_counter()
        got = [
            old_sinkhorn(
                unstack_state(a, i), unstack_state(b, i), spec, module, data, seeds[i],
                args.steps, args.loss,
            )
            for i in range(old_n)
        ]  # fmt: skip
        times["old"].append(time.perf_counter() - t)
        perms["old"] = {g: torch.stack([p[g] for p, _ in got]) for g in spec.groups}
        finals["old"] = [statistics.fmean(h[-10:]) for _, h in got]

        t = time.perf_counter()
        got = [
            sinkhorn_rebasin(
                unstack_state(a, i), unstack_state(b, i), spec, module=module, data=data,
                seed=seeds[i], loss=args.loss, steps=args.steps,
            )
            for i in range(new_n)
        ]  # fmt: skip
        times["new"].append(time.perf_counter() - t)
        perms["new"] = {g: torch.stack([p[g] for p, _ in got]) for g in spec.groups}
        finals["new"] = [statistics.fmean(info["loss_history"][-10:]) for _, info in got]

        for c in chunks:
            t = time.perf_counter()
            parts, hist = [], []
            for s in range(0, n, c):
                e = min(n, s + c)
                perm, info = sinkhorn_batch(
                    {k: v[s:e] for k, v in a.items()}, {k: v[s:e] for k, v in b.items()}, spec,
                    module=module, data=data, seed=seeds[s], pair_seeds=seeds[s:e],
                    loss=args.loss, steps=args.steps,
                )  # fmt: skip
                parts.append(perm)
                hist += info["loss_history"]
            times[f"batch{c}"].append(time.perf_counter() - t)
            perms[f"batch{c}"] = {g: torch.cat([p[g] for p in parts]) for g in spec.groups}
            finals[f"batch{c}"] = [statistics.fmean(h[-10:]) for h in hist]
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    def barriers(name: str) -> list[float]:
        perm = perms[name]
        m = perm[next(iter(perm))].shape[0]
        sub_a = {k: v[:m] for k, v in a.items()}
        aligned = apply(spec, perm, {k: v[:m] for k, v in b.items()}, batch_dims=1)
        return [float(x) for x in lmc_curves(module, sub_a, aligned, test, 25)["barrier"]]

    counts = {"old": old_n, "new": new_n} | {f"batch{c}": n for c in chunks}
    rows = []
    old_rate = _median_rate(times["old"], old_n)
    for name, count in counts.items():
        rate = _median_rate(times[name], count)
        bar = barriers(name)
        rows.append(
            {
                "solver": name,
                "pairs": count,
                "pairs_per_s": rate,
                "s_per_pair": 1 / rate,
                "speedup_vs_old": rate / old_rate,
                "barrier_first_old_pairs": statistics.fmean(bar[:old_n]),
                "barrier_all": statistics.fmean(bar),
                "final_loss_first_old_pairs": statistics.fmean(finals[name][:old_n]),
                "final_loss_all": statistics.fmean(finals[name]),
                "runs_s": times[name],
            }
        )
    result = {
        "zoo": str(args.zoo),
        "architecture": "64-32-32-32-10",
        "loss": args.loss,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }
    print(
        f"loss {args.loss}, {args.steps} steps, {args.threads} thread(s), load average "
        f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        "| solver | pairs | s/pair | pairs/s | vs previous | barrier (first "
        f"{old_n}) | barrier (all) | final loss (first {old_n}) | final loss (all) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['solver']} | {r['pairs']} | {r['s_per_pair']:.3g} | {r['pairs_per_s']:.3g} | "
            f"{r['speedup_vs_old']:.1f}x | {r['barrier_first_old_pairs']:.3f} | "
            f"{r['barrier_all']:.3f} | {r['final_loss_first_old_pairs']:.3f} | "
            f"{r['final_loss_all']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
