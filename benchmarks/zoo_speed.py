"""Zoo training speed: models per second, batched (one shard at once) vs a plain per-model loop.

Both sides train the same models (same init, data order, epochs, batch size, Adam); the loop is the
ordinary way: an ``nn.Module`` and ``torch.optim.Adam`` per model. Reports medians of ``--repeats``
runs, the ratio, the extrapolated time of a whole zoo, and the batched models' test accuracy.

    python benchmarks/zoo_speed.py --threads 1
    python benchmarks/zoo_speed.py --threads 2 --skip-fashion
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from deepalign.core.arch import build
from deepalign.zoo import make_plan
from deepalign.zoo.batched import init_state
from deepalign.zoo.build import order_seed, task_data, train_shard


def loop_train(plan, rows, data) -> None:
    """The baseline: one model after another, the plain PyTorch way."""
    train = data["train"]
    t = plan.training
    for row in rows:
        model = build(plan.arch)
        model.load_state_dict(init_state(plan.arch, row["seed"]))
        opt = torch.optim.Adam(model.parameters(), lr=t.lr)
        g = torch.Generator().manual_seed(order_seed(row["seed"]))
        for _ in range(t.epochs):
            order = torch.randperm(len(train), generator=g)
            for s in range(0, len(train), t.batch_size):
                idx = order[s : s + t.batch_size]
                loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()


def bench(task: str, n_batched: int, n_loop: int, repeats: int, zoo_size: int, **overrides) -> dict:
    plan = make_plan(task, max(n_batched, n_loop), shard_size=n_batched, **overrides)
    data = task_data(plan, None)
    cpu = torch.device("cpu")
    batched, loop, accs = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, rows = train_shard(plan, 0, data, cpu)
        batched.append(n_batched / (time.perf_counter() - t0))
        accs = [r["test_accuracy"] for r in rows]
        t0 = time.perf_counter()
        loop_train(plan, plan.base_rows()[:n_loop], data)
        loop.append(n_loop / (time.perf_counter() - t0))
    b, lo = statistics.median(batched), statistics.median(loop)
    tr = plan.training
    return {
        "task": task,
        "threads": torch.get_num_threads(),
        "training": f"{tr.epochs} epochs, batch {tr.batch_size}, adam lr {tr.lr}, "
        f"{len(data['train'])} training examples",
        "batched_models": n_batched,
        "loop_models": n_loop,
        "batched_models_per_s": b,
        "loop_models_per_s": lo,
        "speedup": b / lo,
        "zoo_size": zoo_size,
        "zoo_minutes_batched": zoo_size / b / 60,
        "zoo_minutes_loop": zoo_size / lo / 60,
        "test_accuracy": {
            "mean": statistics.fmean(accs),
            "min": min(accs),
            "median": statistics.median(accs),
            "max": max(accs),
        },
        "runs_batched": batched,
        "runs_loop": loop,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--digits-models", type=int, default=500, help="one default mlp-digits shard")
    ap.add_argument("--digits-loop-models", type=int, default=10)
    ap.add_argument("--digits-batch-size", type=int, default=None, help="override the task default")
    ap.add_argument("--digits-lr", type=float, default=None, help="override the task default")
    ap.add_argument("--fashion-models", type=int, default=50, help="one default mlp-fashion shard")
    ap.add_argument("--fashion-loop-models", type=int, default=3)
    ap.add_argument("--fashion-repeats", type=int, default=1)
    ap.add_argument("--skip-fashion", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # first use imports for seconds: untimed

    digits = {"batch_size": args.digits_batch_size, "lr": args.digits_lr}
    results = [
        bench(
            "mlp-digits",
            args.digits_models,
            args.digits_loop_models,
            args.repeats,
            2000,
            **{k: v for k, v in digits.items() if v is not None},
        )
    ]
    if not args.skip_fashion:
        results.append(
            bench(
                "mlp-fashion",
                args.fashion_models,
                args.fashion_loop_models,
                args.fashion_repeats,
                1000,
            )
        )
    for r in results:
        a = r["test_accuracy"]
        print(
            f"{r['task']:<12} threads {r['threads']}  batched {r['batched_models_per_s']:7.2f} models/s"
            f"  loop {r['loop_models_per_s']:6.2f} models/s  speedup {r['speedup']:5.1f}x  "
            f"{r['zoo_size']}-model zoo: {r['zoo_minutes_batched']:.1f} min batched, "
            f"{r['zoo_minutes_loop']:.1f} min loop  | acc mean {a['mean']:.2%} min {a['min']:.2%} "
            f"max {a['max']:.2%}  ({r['training']})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
