"""Deep-Align forward pass: pairs aligned per second (one batched forward pass + Hungarian), memory.

For batches of digits MLPs (64-32-32-32-10) and of 784-128-128-128-10 MLPs, with the paper-sized
config (hidden 64, 4 DWS layers, output 128, SAB, max pooling, BatchNorm, 8 heads; our default
16 edge channels + weight-weighted messages), the paper's plain DWSNet inside the same code
(``edge_channels=None, messages=False``: every weight entry carries 64 channels, the in-run
baseline) and a CPU-sized config. Each case runs in a fresh subprocess so its peak resident memory
(``ru_maxrss`` growth over the process after set-up) is its own; times are medians of ``--repeats``
runs after one warm-up. Weight matching (``deepalign.solvers.wm``) runs on the same pairs, one pair
at a time. Freshly initialised networks: the forward cost does not depend on the weights' values.

    python benchmarks/deepalign_speed.py [--repeats 5] [--threads 1] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = {
    "paper": {},
    "paper-dwsnet": {"edge_channels": None, "messages": False},
    "cpu": {"hidden": 32, "edge_channels": 8, "n_layers": 2, "out_features": 64, "n_heads": 4},
}
DIGITS = [64, 32, 32, 32, 10]
MNIST = [784, 128, 128, 128, 10]


def cases(quick: bool) -> list[dict]:
    out = [
        dict(tag="main", widths=DIGITS, config="paper", downsample=None, batch=32),
        dict(tag="main", widths=DIGITS, config="paper", downsample=8, batch=32),
        dict(tag="main", widths=DIGITS, config="paper-dwsnet", downsample=8, batch=32),
        dict(tag="main", widths=DIGITS, config="cpu", downsample=None, batch=32),
        dict(tag="main", widths=MNIST, config="paper", downsample=8, batch=8),
        dict(tag="main", widths=MNIST, config="paper-dwsnet", downsample=8, batch=8),
        dict(tag="main", widths=MNIST, config="cpu", downsample=8, batch=8),
        dict(tag="main", widths=MNIST, config="paper", downsample=8, batch=32),
    ]
    for w in (32, 64, 128):  # growth with the aligned networks' width
        out.append(
            dict(tag="width", widths=[64, w, w, w, 10], config="paper", downsample=8, batch=16)
        )
    for b in (8, 32, 64):  # growth with the number of pairs per pass
        out.append(dict(tag="batch", widths=DIGITS, config="paper", downsample=8, batch=b))
    if quick:
        out = [c for c in out if c["tag"] == "main" and c["batch"] <= 32][:3]
    return out


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_case(case: dict, repeats: int, threads: int, wm_pairs: int) -> dict:
    """One case, measured in this (fresh) process."""
    from deepalign.core import arch
    from deepalign.core.functional import stack_states, unstack_state
    from deepalign.nn.model import DeepAlign, DeepAlignConfig
    from deepalign.nn.weight_space import WeightSpaceLayout
    from deepalign.solvers.assignment import linear_assignment
    from deepalign.solvers.wm import weight_matching

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    nets = [arch.mlp(case["widths"]) for _ in range(2 * case["batch"])]
    states = [{k: v.detach() for k, v in n.state_dict().items()} for n in nets]
    a, b = stack_states(states[0::2]), stack_states(states[1::2])
    layout = WeightSpaceLayout.from_module(nets[0])
    cfg = DeepAlignConfig(**CONFIGS[case["config"]], downsample=case["downsample"])
    model = DeepAlign(layout, cfg).eval()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    with torch.inference_mode():
        t_align = median_time(lambda: model.align(a, b), repeats)
        t_fwd = median_time(lambda: model(a, b), repeats)
        scores = model(a, b)
        t_lsa = median_time(lambda: [linear_assignment(q) for q in scores.values()], repeats)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t_train = None
    if case["tag"] == "main":  # one training step: forward, Sinkhorn, backward (train-mode BN)
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            soft = model.soft(model(a, b))
            loss = sum(-(p.diagonal(dim1=-2, dim2=-1) + 1e-9).log().mean() for p in soft.values())
            loss.backward()

        t_train = median_time(step, max(1, repeats // 2))
        model.eval()

    wm_times = []
    for i in range(min(wm_pairs, case["batch"])):
        sa, sb = unstack_state(a, i), unstack_state(b, i)
        wm_times.append(median_time(lambda sa=sa, sb=sb: weight_matching(sa, sb, layout.spec), 3))
    n = case["batch"]
    return {
        **case,
        "params": model.n_parameters(),
        "align_s_per_pair": t_align / n,
        "forward_s_per_pair": t_fwd / n,
        "hungarian_s_per_pair": t_lsa / n,
        "pairs_per_s": n / t_align,
        "peak_mem_mb": (rss1 - rss0) / 1024,  # ru_maxrss is in KiB on Linux
        "train_step_s_per_pair": None if t_train is None else t_train / n,
        "wm_s_per_pair": statistics.median(wm_times) if wm_times else None,
    }


def reference_gflops(threads: int) -> float:
    """A fixed fp32 matrix product, to say how fast (how contended) the machine was in this run."""
    torch.set_num_threads(threads)
    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / median_time(lambda: x @ y, 5) / 1e9


def table(rows: list[dict]) -> str:
    head = (
        "| networks | config | downsample | batch | params | align ms/pair | forward ms/pair "
        "| Hungarian ms/pair | pairs/s | peak MB | WM ms/pair | train step ms/pair |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        train = r["train_step_s_per_pair"]
        lines.append(
            f"| {'-'.join(map(str, r['widths']))} | {r['config']} | {r['downsample']} | {r['batch']} "
            f"| {r['params'] / 1e6:.2f}M | {1e3 * r['align_s_per_pair']:.1f} "
            f"| {1e3 * r['forward_s_per_pair']:.1f} | {1e3 * r['hungarian_s_per_pair']:.2f} "
            f"| {r['pairs_per_s']:.1f} | {r['peak_mem_mb']:.0f} "
            f"| {1e3 * r['wm_s_per_pair']:.1f} | {'-' if train is None else f'{1e3 * train:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wm-pairs", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case
    args = ap.parse_args()
    if args.case:
        print(
            json.dumps(run_case(json.loads(args.case), args.repeats, args.threads, args.wm_pairs))
        )
        return
    rows = []
    gflops_before = reference_gflops(args.threads)
    for case in cases(args.quick):
        cmd = [
            sys.executable,
            __file__,
            "--case",
            json.dumps(case),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
            "--wm-pairs",
            str(args.wm_pairs),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    gflops = (gflops_before, reference_gflops(args.threads))
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), median of {args.repeats}; reference 1024^3 fp32 matmul: "
        f"{gflops[0]:.0f} GFLOP/s before, {gflops[1]:.0f} after\n"
    )
    for tag in ("main", "width", "batch"):
        sel = [r for r in rows if r["tag"] == tag]
        if sel:
            print(f"## {tag}\n{table(sel)}\n")
    by = {(tuple(r["widths"]), r["config"], r["downsample"], r["batch"]): r for r in rows}
    for widths, ds, batch in ((DIGITS, 8, 32), (MNIST, 8, 8)):
        ours = by.get((tuple(widths), "paper", ds, batch))
        base = by.get((tuple(widths), "paper-dwsnet", ds, batch))
        if ours and base:
            print(
                f"{'-'.join(map(str, widths))}: paper config vs plain DWSNet in the same run: "
                f"{base['align_s_per_pair'] / ours['align_s_per_pair']:.1f}x faster per pair"
            )
    if args.json:
        from deepalign.core.io import atomic_write_text

        atomic_write_text(
            args.json, json.dumps({"reference_gflops": gflops, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
